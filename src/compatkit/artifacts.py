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
#: Where an exported model (``compatkit.export``) carries its input spec and manifest: ONNX
#: ``metadata_props`` keys, and TorchScript extra files.
EXPORT_INPUT_KEY = "compatkit.input"
EXPORT_MANIFEST_KEY = "compatkit.manifest"
EXPORT_INPUT_FILE = "compatkit_input.json"
EXPORT_MANIFEST_FILE = "compatkit_manifest.json"


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


#: Suffixes ``load_vectors_file`` reads and ``save_vectors_file`` writes.
VECTOR_FORMATS = (".safetensors", ".npy", ".npz")


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB chunks).

    Raises:
        CompatkitError: the file does not exist or cannot be read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as err:
        raise CompatkitError(f"cannot read {path}: {err.strerror or err}") from None
    return h.hexdigest()


@dataclass(frozen=True)
class VectorsFile:
    """Vectors read from a file, with what the file knows about them.

    ``ids``: one string per row, or None (a ``.npy`` without ids). ``metadata``: one mapping per
    row, or None. ``version``: the producing model version when the file names it (features
    files, ``.npz`` with a ``version`` entry). ``manifest``: the producing model's manifest
    (features files only). Shapes: vectors (N, D) float32.
    """

    vectors: np.ndarray
    ids: list[str] | None = None
    metadata: list[dict[str, Any]] | None = None
    version: str | None = None
    manifest: Manifest | None = None


def _vectors_error(path: Path, detail: str) -> CompatkitError:
    return CompatkitError(f"cannot read vectors from {path}: {detail} (formats read: "
                          f"{', '.join(VECTOR_FORMATS)}: a compatkit features file, a .npy "
                          "(N, D) array, or a .npz with vectors and optional ids, metadata and "
                          "version)")


def load_vectors_file(path: str | Path, *, ids: str | Path | None = None) -> VectorsFile:
    """Read vectors from a features file (``.safetensors``), a ``.npy`` (N, D) array or a
    ``.npz`` with ``vectors`` (N, D) and optional ``ids`` (N,), ``metadata`` (N,) JSON objects
    and ``version``.

    Args:
        ids: a text file with one id per line, one per row (a ``.npy`` has no ids of its own).

    Raises:
        CompatkitError: a missing file, an unknown format (the message lists those read), a
            malformed array, or ids and rows that do not pair up.
    """
    path = Path(path)
    if not path.is_file():
        raise CompatkitError(f"vectors file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in VECTOR_FORMATS:
        raise _vectors_error(path, f"unknown suffix {path.suffix!r}")
    if suffix == ".safetensors":
        fs = load_features(path)
        row_ids = ([str(int(i)) for i in fs.ids] if fs.ids is not None
                   else [str(i) for i in range(len(fs.features))])
        out = VectorsFile(fs.features, row_ids, [{"label": int(lab)} for lab in fs.labels],
                          fs.manifest.model_version, fs.manifest)
    elif suffix == ".npy":
        try:
            out = VectorsFile(np.load(path, allow_pickle=False))
        except (ValueError, OSError) as err:
            raise _vectors_error(path, str(err)) from None
    else:
        out = _load_npz(path)
    if out.vectors.ndim != 2 or out.vectors.dtype.kind not in "fiu":
        raise _vectors_error(path, f"expected an (N, D) array of numbers, got "
                                   f"{out.vectors.dtype} of shape {out.vectors.shape}")
    vectors = np.ascontiguousarray(out.vectors, dtype=np.float32)
    row_ids = out.ids
    if ids is not None:
        ids = Path(ids)
        if not ids.is_file():
            raise CompatkitError(f"ids file {ids} does not exist")
        row_ids = [ln.strip() for ln in ids.read_text().splitlines() if ln.strip()]
    if row_ids is not None and len(row_ids) != len(vectors):
        raise CompatkitError(f"{path} holds {len(vectors)} vectors but {len(row_ids)} ids")
    return VectorsFile(vectors, row_ids, out.metadata, out.version, out.manifest)


def _load_npz(path: Path) -> VectorsFile:
    import json

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError) as err:
        raise _vectors_error(path, str(err)) from None
    if "vectors" not in arrays:
        raise _vectors_error(path, f"the .npz has no vectors entry "
                                   f"(entries: {', '.join(sorted(arrays)) or 'none'})")
    metadata = None
    if "metadata" in arrays:
        try:
            metadata = [json.loads(str(m)) for m in arrays["metadata"].tolist()]
        except json.JSONDecodeError as err:
            raise _vectors_error(path, f"metadata is not one JSON object per row: {err}") from None
        if not all(isinstance(m, dict) for m in metadata):
            raise _vectors_error(path, "metadata is not one JSON object per row")
        if len(metadata) != len(arrays["vectors"]):
            raise _vectors_error(path, f"{len(metadata)} metadata rows for "
                                       f"{len(arrays['vectors'])} vectors")
    version = str(arrays["version"]) if "version" in arrays else None
    ids = [str(i) for i in arrays["ids"].tolist()] if "ids" in arrays else None
    return VectorsFile(arrays["vectors"], ids, metadata, version)


def save_vectors_file(
    path: str | Path, vectors: np.ndarray, *, ids: list[str] | None = None,
    metadata: list[dict[str, Any]] | None = None, version: str | None = None,
) -> Path:
    """Write vectors as a ``.npy`` (the array alone) or a ``.npz`` (``ids``, default the row
    numbers; ``vectors``; ``metadata`` as JSON objects; ``version``), atomically.

    Shapes: vectors (N, D), written as float32.

    Raises:
        CompatkitError: another suffix (features files are written by ``save_features``).
        ValueError: ids or metadata that do not pair up with the rows.
    """
    import io
    import json

    path = Path(path)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    buf = io.BytesIO()
    if path.suffix.lower() == ".npy":
        np.save(buf, vectors, allow_pickle=False)
    elif path.suffix.lower() == ".npz":
        ids = [str(i) for i in range(len(vectors))] if ids is None else [str(i) for i in ids]
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        arrays: dict[str, np.ndarray] = {"ids": np.asarray(ids, dtype=str), "vectors": vectors}
        if metadata is not None:
            if len(metadata) != len(vectors):
                raise ValueError(f"{len(metadata)} metadata rows for {len(vectors)} vectors")
            arrays["metadata"] = np.asarray([json.dumps(m) for m in metadata], dtype=str)
        if version is not None:
            arrays["version"] = np.asarray(version)
        np.savez(buf, **arrays)
    else:
        raise CompatkitError(f"cannot write vectors to {path}: the suffix must be .npy or .npz "
                             "(or .safetensors for a features file)")
    atomic_write_bytes(path, buf.getvalue())
    return path
