"""The one artifact format: safetensors tensors plus a JSON manifest.

A model artifact is a folder with ``model.safetensors`` and ``manifest.json``; a features file
is one ``.safetensors`` file whose metadata holds the producing model's manifest, so an
embedding always travels with its model version, dimension and normalisation.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from compatkit.config_base import StrictModel
from compatkit.errors import CompatkitError

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.safetensors"


class InputSpec(StrictModel):
    """How raw images must be prepared for the model."""

    image_size: int | None
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class Manifest(StrictModel):
    """Everything needed to rebuild, trust and compare a trained module's outputs."""

    kind: Literal["model", "transformation", "side_info"] = "model"
    model_version: str
    spec: dict[str, Any]
    embed_dim: int
    normalized: bool
    class_ids: tuple[int, ...] = ()
    input: InputSpec | None = None
    method: str = "independent"
    compatible_with: tuple[str, ...] = Field(
        default=(), description="versions whose embeddings this model's queries may search"
    )
    transforms_from: str | None = Field(
        default=None, description="for a transformation: the version whose embeddings it maps"
    )
    transforms_to: str | None = Field(
        default=None, description="for a transformation: the version whose space it maps into"
    )
    lineage: tuple[str, ...] = Field(
        default=(), description="for upgraded features: every version and transformation they "
                                "went through, oldest first"
    )
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    code_version: str = ""
    config: dict[str, Any] = Field(default_factory=dict)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short sha256 of a state dict's names and values (the model version's suffix)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def save_module(directory: str | Path, module: torch.nn.Module, manifest: Manifest) -> Path:
    """Write ``module``'s weights and ``manifest`` into ``directory`` (atomically, file by file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".weights.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, directory / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_bytes(directory / MANIFEST_NAME, manifest.model_dump_json(indent=2).encode())
    return directory


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of a model artifact folder; a missing or corrupt one raises clearly."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise CompatkitError(f"{directory} is not a compatkit artifact: {MANIFEST_NAME} missing")
    try:
        return Manifest.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as err:
        raise CompatkitError(f"corrupt manifest {path}: {err}") from None


def load_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a model artifact folder; a missing or corrupt file raises clearly."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CompatkitError(f"{directory} has no {WEIGHTS_NAME}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CompatkitError(f"corrupt checkpoint {path}: {err}") from None


def load_module(directory: str | Path, *, device: str | torch.device = "cpu"):
    """Rebuild the module of an artifact folder from its manifest and weights.

    Returns (module in eval mode on ``device``, manifest).
    """
    from compatkit.models import create_model, create_transformation
    from compatkit.models.side_info import create_side_info_model

    manifest = read_manifest(directory)
    builders = {
        "model": create_model,
        "transformation": create_transformation,
        "side_info": create_side_info_model,
    }
    module = builders[manifest.kind](**manifest.spec)
    try:
        module.load_state_dict(load_state(directory))
    except RuntimeError as err:
        raise CompatkitError(f"checkpoint {directory} does not match its manifest: {err}") from None
    return module.to(device).eval(), manifest


@dataclass(frozen=True)
class FeatureSet:
    """Embeddings with their labels, optional item ids and the producing model's manifest.

    Shapes: features (N, D) float32; labels (N,) int64; ids (N,) int64 or None.
    """

    features: np.ndarray
    labels: np.ndarray
    manifest: Manifest
    ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {self.features.shape}")
        if self.labels.shape != (self.features.shape[0],):
            raise ValueError(f"labels must have shape ({self.features.shape[0]},), "
                             f"got {self.labels.shape}")
        if self.features.shape[1] != self.manifest.embed_dim:
            raise ValueError(f"features have dimension {self.features.shape[1]} but the "
                             f"manifest says {self.manifest.embed_dim}")


def save_features(path: str | Path, fs: FeatureSet) -> Path:
    """Write a features file (``.safetensors``) atomically."""
    path = Path(path)
    tensors = {"features": np.ascontiguousarray(fs.features, dtype=np.float32),
               "labels": np.ascontiguousarray(fs.labels, dtype=np.int64)}
    if fs.ids is not None:
        tensors["ids"] = np.ascontiguousarray(fs.ids, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_numpy(tensors, tmp, metadata={"manifest": fs.manifest.model_dump_json()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_features(path: str | Path) -> FeatureSet:
    """Read a features file written by ``save_features``; corrupt files raise clearly."""
    path = Path(path)
    if not path.is_file():
        raise CompatkitError(f"features file {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
        tensors = load_numpy(path)
        manifest = Manifest.model_validate_json(meta["manifest"])
    except (SafetensorError, OSError, KeyError, ValidationError, ValueError) as err:
        raise CompatkitError(f"{path} is not a valid compatkit features file: {err}") from None
    return FeatureSet(tensors["features"], tensors["labels"], manifest, tensors.get("ids"))


def load_vectors(path: str | Path) -> np.ndarray:
    """An (n, d) float32 array of vectors from a ``.npy`` file, an ``.npz`` file (its one
    array, or the one named ``features``) or a compatkit features file (``.safetensors``).

    Raises:
        CompatkitError: a missing or unreadable file, an unknown suffix, or no 2-D array.
    """
    path = Path(path)
    if not path.is_file():
        raise CompatkitError(f"vectors file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        arr = load_features(path).features
    elif suffix in (".npy", ".npz"):
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise CompatkitError(f"{path} is not a readable numpy file: {err}") from None
        if suffix == ".npy":
            arr = loaded
        else:
            with loaded:
                names = list(loaded.files)
                if "features" in names:
                    names = ["features"]
                if len(names) != 1:
                    raise CompatkitError(f"{path} holds arrays {sorted(loaded.files)}; name the "
                                         "vectors 'features' or store only one array")
                arr = loaded[names[0]]
    else:
        raise CompatkitError(f"vectors file {path} must be .npy, .npz or .safetensors, got "
                             f"{suffix or 'no suffix'!r}")
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise CompatkitError(f"{path} must hold a 2-D float array of vectors, got shape "
                             f"{arr.shape} of {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)
