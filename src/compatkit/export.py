"""Export a compatkit model as one self-contained ONNX or TorchScript file.

The exported graph maps normalised images ``(N, C, H, W)`` float32 (``(pixels / 255 - mean) /
std``) to the model's embedding ``(N, D)`` (L2-normalised when the model is). The file carries
the model's input spec and manifest (ONNX ``metadata_props``, TorchScript extra files), so
``compatkit index version NAME --onnx FILE --dim D`` needs no other option.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from compatkit.artifacts import (
    EXPORT_INPUT_FILE,
    EXPORT_INPUT_KEY,
    EXPORT_MANIFEST_FILE,
    EXPORT_MANIFEST_KEY,
    Manifest,
    atomic_write_bytes,
    load_module,
)
from compatkit.errors import CompatkitError

logger = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "torchscript"]
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
ONNX_OPSET = 17


class EmbedOnly(nn.Module):
    """A model's ``embed`` as its ``forward`` (what an exported file computes).

    Shapes: x (N, C, H, W) float32, normalised -> (N, D).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def export_model(artifact_dir: str | Path, out: str | Path, *,
                 format: ExportFormat = "onnx") -> Path:
    """Write the model artifact at ``artifact_dir`` as one ``format`` file at ``out``.

    Raises:
        CompatkitError: not an image model (no input spec), an unknown format, or the
            ``onnx`` package missing for an ONNX export.
    """
    if format not in EXPORT_FORMATS:
        raise CompatkitError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got "
                             f"{format!r}")
    model, manifest = load_module(artifact_dir)
    if manifest.kind != "model" or manifest.input is None:
        raise CompatkitError(f"{artifact_dir} holds a {manifest.kind} without an input spec, "
                             "not an image model")
    size = manifest.input.image_size or 32
    example = torch.zeros(2, manifest.input.in_chans, size, size)
    wrapped = EmbedOnly(model).eval()
    input_json = manifest.input.model_dump_json()
    manifest_json = _exported_manifest(manifest).model_dump_json()
    out = Path(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on shape checks fixed by the trace
        data = (_to_onnx(wrapped, example, input_json, manifest_json,
                         fixed_size=manifest.input.image_size is not None) if format == "onnx"
                else _to_torchscript(wrapped, example, input_json, manifest_json))
    atomic_write_bytes(out, data)
    logger.info("exported %s (%s) to %s", manifest.model_version, format, out)
    return out


def _exported_manifest(manifest: Manifest) -> Manifest:
    """The manifest without the bulky training config (the weights travel in the file)."""
    return manifest.model_copy(update={"config": {}, "data": {}})


def _to_torchscript(module: nn.Module, example: torch.Tensor, input_json: str,
                    manifest_json: str) -> bytes:
    import io

    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={EXPORT_INPUT_FILE: input_json,
                                              EXPORT_MANIFEST_FILE: manifest_json})
    return buf.getvalue()


def _to_onnx(module: nn.Module, example: torch.Tensor, input_json: str,
             manifest_json: str, *, fixed_size: bool) -> bytes:
    import io

    try:
        import onnx
    except ImportError:
        raise CompatkitError("an ONNX export needs onnx: pip install 'compatkit[onnx]'") from None
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "batch"} if fixed_size else
                                        {0: "batch", 2: "height", 3: "width"},
                                        "embeddings": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in ((EXPORT_INPUT_KEY, input_json), (EXPORT_MANIFEST_KEY, manifest_json)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()
