"""Embedding images with a trained model, batch by batch, on any device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from compatkit.artifacts import FeatureSet, InputSpec, load_module
from compatkit.data import normalize
from compatkit.errors import CompatkitError

if TYPE_CHECKING:
    from compatkit.train.config import DataConfig


@torch.no_grad()
def embed_images(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor], images: np.ndarray,
    spec: InputSpec, *,
    batch_size: int = 512, device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Embeddings of uint8 images with the model's own normalisation, in input order.

    ``model`` is a module with ``embed`` or any callable from image batches to embeddings.

    Shapes: images (N, C, H, W) uint8 → (N, D) float32 (L2-normalised when the model is).
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    if images.shape[1] != spec.in_chans:
        raise ValueError(f"model expects {spec.in_chans} channels, images have {images.shape[1]}")
    if spec.image_size is not None and images.shape[2:] != (spec.image_size, spec.image_size):
        raise ValueError(f"model expects {spec.image_size}×{spec.image_size} images, "
                         f"got {images.shape[2]}×{images.shape[3]}")
    device = torch.device(device)
    embed = getattr(model, "embed", model)
    owner = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
    was_training = owner.training if isinstance(owner, nn.Module) else None
    if isinstance(owner, nn.Module):
        owner.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start:start + batch_size]).to(device)
            x = normalize(batch, spec.mean, spec.std)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                emb = embed(x)
            out.append(emb.float().cpu().numpy())
    finally:
        if was_training is not None:
            owner.train(was_training)
    if not out:
        return np.zeros((0, getattr(model, "embed_dim", 0)), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def embed_artifact(
    artifact_dir: str | Path, *, data: DataConfig | None = None, part: str = "test",
    batch_size: int = 512, device: str | torch.device = "cpu",
) -> FeatureSet:
    """Embed a dataset part with a trained model artifact → features with labels and manifest.

    ``data`` defaults to the data config the model was trained with, so ``part="test"`` is
    exactly the model's own held-out retrieval set.
    """
    from compatkit.train.config import DataConfig
    from compatkit.train.prepare import evaluation_images

    model, manifest = load_module(artifact_dir, device=device)
    if manifest.kind != "model" or manifest.input is None:
        raise CompatkitError(f"{artifact_dir} holds a {manifest.kind}, not an image model")
    if data is None:
        data = DataConfig.model_validate(manifest.config.get("data", {}))
    images = evaluation_images(data, part)
    feats = embed_images(model, images.images, manifest.input, batch_size=batch_size,
                         device=device)
    return FeatureSet(feats, images.labels.astype(np.int64), manifest)
