"""Embedders (sources → vectors of one version) and transformations (vectors → vectors).

The index only needs the ``Embedder`` protocol: ``version``, ``dim`` and
``embed_sources(sources) -> (n, dim) float32``. ``ArtifactEmbedder`` loads a model artifact;
``HashEmbedder`` is a cheap deterministic stand-in for tests and load benchmarks. A version's
embedder is described by a JSON spec stored with the version, so any process that opens the
store (a server, a backfill worker) can rebuild it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from compatkit.errors import CompatkitError
from compatkit.index.vectors import l2_normalize
from compatkit.index.versions import VersionInfo

if TYPE_CHECKING:
    from compatkit.artifacts import InputSpec

logger = logging.getLogger(__name__)

#: A source: a local path, a ``file://`` URI, or the encoded bytes of the raw item itself.
Source = str | bytes


@runtime_checkable
class Embedder(Protocol):
    """Embeds raw items of one model version.

    Shapes: ``embed_sources(n sources) -> (n, dim)`` float32, in input order.
    """

    version: str
    dim: int

    def embed_sources(self, sources: Sequence[Source]) -> np.ndarray: ...


def _source_bytes(source: Source) -> bytes:
    return source if isinstance(source, bytes) else source.encode("utf-8")


def _unit_vector(seed: int, source: Source, dim: int) -> np.ndarray:
    digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + _source_bytes(source))
    rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
    v = rng.standard_normal(dim)
    return v / np.linalg.norm(v)


class HashEmbedder:
    """Deterministic unit vectors from a hash of each source; no model, no file access.

    With ``anchor_seed``, each vector is ``normalize(w·h(anchor_seed) + (1-w)·h(seed))``, so it
    correlates with the vectors of the embedder seeded ``anchor_seed`` (a stand-in for a
    backward-compatible new model). Used by tests and ``benchmarks/serve_load.py``.

    Args:
        version: the model version it embeds for.
        dim: output dimension.
        seed: hash seed. Default 0.
        anchor_seed: seed of the embedder it should resemble, or None.
        anchor_weight: w in [0, 1]. Default 0.
    """

    def __init__(self, version: str, dim: int, *, seed: int = 0, anchor_seed: int | None = None,
                 anchor_weight: float = 0.0) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0.0 <= anchor_weight <= 1.0:
            raise ValueError(f"anchor_weight must lie in [0, 1], got {anchor_weight}")
        self.version, self.dim, self.seed = version, dim, seed
        self.anchor_seed, self.anchor_weight = anchor_seed, anchor_weight

    def embed_sources(self, sources: Sequence[Source]) -> np.ndarray:
        out = np.empty((len(sources), self.dim), dtype=np.float64)
        for i, src in enumerate(sources):
            v = _unit_vector(self.seed, src, self.dim)
            if self.anchor_seed is not None and self.anchor_weight > 0:
                w = self.anchor_weight
                v = w * _unit_vector(self.anchor_seed, src, self.dim) + (1 - w) * v
            out[i] = v
        return l2_normalize(out.astype(np.float32))

    def spec(self) -> dict[str, Any]:
        """The JSON spec that rebuilds this embedder (``embedder_from_spec``)."""
        return {"kind": "hash", "seed": self.seed, "anchor_seed": self.anchor_seed,
                "anchor_weight": self.anchor_weight}


def read_source(source: Source) -> bytes:
    """The encoded bytes of a source: a local path, a ``file://`` URI, or bytes as they are.

    Raises:
        CompatkitError: another URI scheme, or a path that is not a readable file.
    """
    if isinstance(source, bytes):
        return source
    path = source[len("file://"):] if source.startswith("file://") else source
    if "://" in path:
        raise CompatkitError(f"source {source!r}: only local paths and file:// URIs can be read")
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise CompatkitError(f"source {source!r} cannot be read: {err.strerror}") from None


def load_source_image(source: Source, spec: InputSpec) -> np.ndarray:
    """Decode a raw item to the model's input: (C, H, W) uint8 at ``spec.image_size``.

    Raises:
        CompatkitError: the source cannot be read or is not an image (``DataRootError``).
    """
    from compatkit.data.files import decode_image

    mode = "L" if spec.in_chans == 1 else "RGB"
    where = "image bytes" if isinstance(source, bytes) else f"source {source!r}"
    arr = decode_image(read_source(source), mode=mode, where=where, size=spec.image_size)
    if arr.shape[2] != spec.in_chans:
        raise CompatkitError(f"{where} has {arr.shape[2]} channels, the model expects "
                             f"{spec.in_chans}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class ArtifactEmbedder:
    """Embeds image sources with a model or side-info artifact (``compatkit.artifacts`` folder).

    Args:
        directory: the artifact folder (``manifest.json`` + ``model.safetensors``).
        device: torch device for inference. Default "cpu".
        batch_size: images per forward pass. Default 256.

    Raises:
        CompatkitError: the folder holds no image model (or no input spec).
    """

    def __init__(self, directory: str | Path, *, device: str = "cpu",
                 batch_size: int = 256) -> None:
        from compatkit.artifacts import load_module

        self.model, self.manifest = load_module(directory, device=device)
        if self.manifest.kind == "transformation" or self.manifest.input is None:
            raise CompatkitError(f"{directory} holds a {self.manifest.kind} without an input "
                                 "spec, not an image model")
        self.directory = Path(directory)
        self.version = self.manifest.model_version
        self.dim = int(self.manifest.embed_dim)
        self.device, self.batch_size = device, batch_size

    def embed_sources(self, sources: Sequence[Source]) -> np.ndarray:
        if not sources:
            return np.zeros((0, self.dim), dtype=np.float32)
        images = np.stack([load_source_image(s, self.manifest.input) for s in sources])
        return self.embed_images(images)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """Embed decoded uint8 images. Shapes: (n, C, H, W) uint8 -> (n, dim) float32."""
        from compatkit.inference import embed_images

        return embed_images(self.model, images, self.manifest.input,
                            batch_size=self.batch_size, device=self.device)

    def classifier_weights(self) -> np.ndarray | None:
        """The model's classifier matrix (C, D) as float32, or None without a classifier."""
        clf = getattr(self.model, "classifier", None)
        if clf is None:
            return None
        return clf.weight.detach().cpu().float().numpy()


class ArtifactTransform:
    """Applies a transformation artifact (BiCT, FCT, FastFill) to stored vectors.

    Thin wrapper over ``compatkit.feature_upgrade.apply_transformation`` and ``sigma_scores``.

    Args:
        directory: the artifact folder of a ``kind="transformation"`` manifest.
        device: torch device. Default "cpu".
        batch_size: rows per forward pass. Default 4096.
    """

    def __init__(self, directory: str | Path, *, device: str = "cpu",
                 batch_size: int = 4096) -> None:
        from compatkit.artifacts import load_module

        self.module, self.manifest = load_module(directory, device=device)
        if self.manifest.kind != "transformation":
            raise CompatkitError(f"{directory} holds a {self.manifest.kind}, not a transformation")
        self.d_in = int(self.module.d_in)
        self.d_out = int(self.module.d_out)
        self.d_side = self.module.d_side
        self.batch_size = batch_size

    def apply(self, old: np.ndarray, side: np.ndarray | None = None) -> np.ndarray:
        """Map old vectors into the new space. Shapes: (n, d_in) [+ (n, d_side)] -> (n, d_out).

        Raises:
            ValueError: wrong shapes, NaN/inf, or side-information missing or unexpected.
        """
        from compatkit.feature_upgrade import apply_transformation

        return apply_transformation(self.module, old, side, batch_size=self.batch_size,
                                    normalize=self.manifest.normalized)

    def sigma(self, old: np.ndarray, side: np.ndarray | None = None) -> np.ndarray:
        """FastFill's predicted log-uncertainty per item. Shapes: (n, d_in) -> (n,).

        Raises:
            ValueError: the transformation has no σ head.
        """
        from compatkit.feature_upgrade import sigma_scores

        return sigma_scores(self.module, old, side, batch_size=self.batch_size)


def embedder_from_spec(info: VersionInfo, *, device: str = "cpu") -> Embedder:
    """Rebuild a version's embedder from its stored spec.

    Raises:
        CompatkitError: the version has no embedder, or its artifact disagrees with the
            registered version name or dimension.
    """
    spec = dict(info.embedder)
    kind = spec.pop("kind", "none")
    if kind == "hash":
        return HashEmbedder(info.name, info.dim, **spec)
    if kind == "artifact":
        emb = ArtifactEmbedder(spec["path"], device=device)
        if emb.version != info.name or emb.dim != info.dim:
            raise CompatkitError(f"artifact {spec['path']} holds version {emb.version!r} "
                                 f"(dim {emb.dim}), registered as {info.name!r} (dim {info.dim})")
        return emb
    raise CompatkitError(f"version {info.name!r} has no embedder: register it from a model "
                         "artifact, or add items with vectors instead of sources")

