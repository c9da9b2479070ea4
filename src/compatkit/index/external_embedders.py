"""Embedders from outside compatkit: an ONNX file, a TorchScript file or a Python factory.

A version's embedder spec (stored with the version, rebuilt by every process that opens the
store: server, backfill workers, torchrun ranks, Ray actors) may be

- ``{"kind": "onnx", "path": ..., "input": ...}``: run with onnxruntime (the CUDA provider on a
  CUDA device when onnxruntime has it, else the CPU provider);
- ``{"kind": "torchscript", "path": ..., "input": ...}``: a ``torch.jit`` file;
- ``{"kind": "python", "factory": "package.module:factory", "kwargs": {...}}``: the factory
  called with ``kwargs`` returns an object with ``embed_sources(sources) -> (n, dim)``.

``input`` says what the model takes: ``{"kind": "image", "image_size", "in_chans", "mean",
"std"}`` (sources decoded, resized, scaled to [0, 1] and normalised per channel: (N, C, H, W)
float32) or ``{"kind": "array"}`` (each source a ``.npy`` array, stacked as they are). Left
out, it is read from the file (``compatkit export`` writes it there). ``resolve_spec`` fills in
the absolute path, the input and the sha256 of every file the embedder reads; an embedder whose
file changed since is refused (``EmbedderChangedError``).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compatkit.artifacts import EXPORT_INPUT_FILE, EXPORT_INPUT_KEY, InputSpec, file_sha256
from compatkit.errors import CompatkitError
from compatkit.index.embedders import (
    Embedder,
    Source,
    embedder_from_spec,
    load_source_image,
    read_source,
)
from compatkit.index.vectors import l2_normalize
from compatkit.index.versions import VersionInfo

logger = logging.getLogger(__name__)

EXTERNAL_KINDS: tuple[str, ...] = ("onnx", "torchscript", "python")
EMBEDDER_KINDS: tuple[str, ...] = ("none", "hash", "artifact", *EXTERNAL_KINDS)
DEFAULT_BATCH_SIZE = 64
_SPEC_KEYS = {
    "onnx": {"kind", "path", "input", "batch_size", "files"},
    "torchscript": {"kind", "path", "input", "batch_size", "files"},
    "python": {"kind", "factory", "kwargs", "files"},
}


class EmbedderChangedError(CompatkitError):
    """A file an embedder reads is not the one its version was registered with."""


# ------------------------------------------------------------------ input specs


def image_input(*, in_chans: int, image_size: int | None = None,
                mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> dict[str, Any]:
    """An image input spec; mean and std default to 0 and 1 per channel (pixels / 255).

    Raises:
        ValueError: a non-positive size or channel count, mean/std lengths other than
            ``in_chans``, or a non-positive std.
    """
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {in_chans!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image size must be a positive integer, got {image_size!r}")
    mean = (0.0,) * in_chans if mean is None else tuple(float(m) for m in mean)
    std = (1.0,) * in_chans if std is None else tuple(float(s) for s in std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean and std need {in_chans} values for {in_chans}-channel images, "
                         f"got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise ValueError(f"std values must be positive, got {std}")
    return {"kind": "image", "image_size": image_size, "in_chans": in_chans,
            "mean": list(mean), "std": list(std)}


def check_input(value: Any) -> dict[str, Any]:
    """A validated input spec (``image`` or ``array``) from its JSON form.

    Raises:
        ValueError: another kind, or bad image fields.
    """
    if not isinstance(value, Mapping) or value.get("kind") not in ("image", "array"):
        raise ValueError(f"input must be {{'kind': 'image', ...}} or {{'kind': 'array'}}, got "
                         f"{value!r}")
    if value["kind"] == "array":
        if set(value) != {"kind"}:
            raise ValueError(f"an array input takes no other fields, got {dict(value)!r}")
        return {"kind": "array"}
    extra = set(value) - {"kind", "image_size", "in_chans", "mean", "std"}
    if extra or "in_chans" not in value:
        raise ValueError(f"an image input needs in_chans (and optional image_size, mean, std), "
                         f"got {dict(value)!r}")
    return image_input(in_chans=value["in_chans"], image_size=value.get("image_size"),
                       mean=value.get("mean"), std=value.get("std"))


def spec_from_options(
    *, onnx: str | Path | None = None, torchscript: str | Path | None = None,
    python: str | None = None, kwargs: str | Mapping[str, Any] | None = None,
    image_size: int | None = None, channels: int | None = None,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    raw_arrays: bool = False,
) -> dict[str, Any] | None:
    """The embedder spec the CLI options describe (None: none given), before ``resolve_spec``.

    Raises:
        ValueError: several model kinds, options that do not belong to the kind, or kwargs
            that are not a JSON object.
    """
    given = {k: v for k, v in (("onnx", onnx), ("torchscript", torchscript), ("python", python))
             if v is not None}
    image_options = any(v is not None for v in (image_size, channels, mean, std))
    if len(given) > 1:
        raise ValueError(f"give one of --onnx, --torchscript, --python, got "
                         f"{', '.join('--' + k for k in given)}")
    if not given:
        if kwargs is not None or image_options or raw_arrays:
            raise ValueError("--kwargs and the input options need --onnx, --torchscript or "
                             "--python")
        return None
    kind, value = next(iter(given.items()))
    if kind == "python":
        if image_options or raw_arrays:
            raise ValueError("a python embedder decodes its own sources: --image-size, "
                             "--channels, --mean, --std and --raw-arrays do not apply")
        return {"kind": "python", "factory": str(value), "kwargs": _parse_kwargs(kwargs)}
    if kwargs is not None:
        raise ValueError("--kwargs goes with --python")
    spec: dict[str, Any] = {"kind": kind, "path": str(value)}
    if raw_arrays and image_options:
        raise ValueError("--raw-arrays takes no --image-size, --channels, --mean or --std")
    if raw_arrays:
        spec["input"] = {"kind": "array"}
    elif image_options:
        if channels is None:
            raise ValueError("an image input spec needs --channels (1 or 3)")
        spec["input"] = image_input(in_chans=channels, image_size=image_size, mean=mean,
                                    std=std)
    return spec


def _parse_kwargs(kwargs: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"--kwargs is not JSON: {err}") from None
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"kwargs must be a JSON object, got {kwargs!r}")
    return dict(kwargs)


# ------------------------------------------------------------------ sources -> model input


def prepare_inputs(sources: Sequence[Source], input_spec: Mapping[str, Any]) -> np.ndarray:
    """The model input of a batch of sources.

    Shapes: image: (n, C, H, W) float32, ``(pixels / 255 - mean) / std``; array: the sources'
    ``.npy`` arrays stacked, float32.

    Raises:
        CompatkitError: a source that cannot be read or decoded, or arrays of different shapes.
    """
    if input_spec["kind"] == "array":
        arrays = []
        for src in sources:
            try:
                arrays.append(np.load(io.BytesIO(read_source(src)), allow_pickle=False))
            except (ValueError, OSError) as err:
                where = "array bytes" if isinstance(src, bytes) else f"source {src!r}"
                raise CompatkitError(f"{where} is not a .npy array: {err}") from None
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise CompatkitError(f"array sources of one batch must share a shape, got "
                                 f"{sorted(shapes)}")
        return np.stack(arrays).astype(np.float32)
    spec = InputSpec(image_size=input_spec["image_size"], in_chans=input_spec["in_chans"],
                     mean=tuple(input_spec["mean"]), std=tuple(input_spec["std"]))
    return prepare_images(np.stack([load_source_image(s, spec) for s in sources]), input_spec)


def prepare_images(images: np.ndarray, input_spec: Mapping[str, Any]) -> np.ndarray:
    """Decoded images to the model input of an image spec (the same arithmetic as
    ``compatkit.data.normalize``, so exported and native models see the same numbers).

    Shapes: (n, C, H, W) uint8 -> (n, C, H, W) float32, ``(pixels / 255 - mean) / std``.
    """
    c = input_spec["in_chans"]
    mean = np.asarray(input_spec["mean"], dtype=np.float32).reshape(1, c, 1, 1)
    std = np.asarray(input_spec["std"], dtype=np.float32).reshape(1, c, 1, 1)
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def _probe_input(input_spec: Mapping[str, Any]) -> np.ndarray | None:
    """One all-zero input of the spec's shape, or None when the shape is not fixed."""
    if input_spec["kind"] != "image" or input_spec["image_size"] is None:
        return None
    s = input_spec["image_size"]
    return np.zeros((1, input_spec["in_chans"], s, s), dtype=np.float32)


def _describe_input(input_spec: Mapping[str, Any]) -> str:
    if input_spec["kind"] == "array":
        return "raw arrays"
    size = input_spec["image_size"]
    px = f"{size}×{size}px" if size is not None else "source-sized"
    return f"{input_spec['in_chans']}-channel {px} images"


# ------------------------------------------------------------------ model files


class _ModelFileEmbedder(ABC):
    """Shared part of the ONNX and TorchScript embedders: sources -> batches -> (n, dim)."""

    kind = ""

    def __init__(self, path: Path, *, version: str, dim: int, input_spec: Mapping[str, Any],
                 normalized: bool, batch_size: int) -> None:
        self.path, self.version, self.dim = path, version, dim
        self.input = dict(input_spec)
        self.normalized, self.batch_size = normalized, batch_size

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw output for one prepared batch. Shapes: (b, ...) -> (b, D)."""

    def embed_sources(self, sources: Sequence[Source]) -> np.ndarray:
        if not sources:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = [self.embed_inputs(prepare_inputs(sources[i:i + self.batch_size], self.input))
               for i in range(0, len(sources), self.batch_size)]
        return np.concatenate(out)

    def embed_inputs(self, batch: np.ndarray) -> np.ndarray:
        """Embed prepared inputs (``prepare_inputs``). Shapes: (n, ...) -> (n, dim) float32.

        Raises:
            CompatkitError: the model gives another shape than (n, dim).
        """
        out = np.asarray(self.run(batch), dtype=np.float32)
        if out.shape != (len(batch), self.dim):
            raise CompatkitError(f"{self.kind} model {self.path} gives outputs of shape "
                                 f"{out.shape} for {len(batch)} inputs; version "
                                 f"{self.version!r} expects ({len(batch)}, {self.dim})")
        return l2_normalize(out) if self.normalized else out

    def check(self) -> None:
        """Embed one all-zero input of the spec's shape: a wrong input spec or output
        dimension fails here, with a message naming both."""
        probe = _probe_input(self.input)
        if probe is None:
            return
        try:
            out = np.asarray(self.run(probe))
        except Exception as err:  # the runtime's own error type (onnxruntime, torch.jit)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CompatkitError(
                f"{self.kind} model {self.path} cannot embed {_describe_input(self.input)} "
                f"(input shape {probe.shape}): check the input spec (image size, channels): "
                f"{first}") from None
        if out.ndim != 2 or out.shape[1] != self.dim:
            raise CompatkitError(f"{self.kind} model {self.path} gives {out.shape[1:]}-shaped "
                                 f"embeddings, but version {self.version!r} is registered "
                                 f"with dim {self.dim}")


def onnx_providers(device: str, available: Sequence[str]) -> list[Any]:
    """onnxruntime providers for a torch-style device: CUDA (with its device id) first on a
    ``cuda[:i]`` device when onnxruntime has it, and the CPU provider."""
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device.startswith("cuda"):
        logger.warning("onnxruntime has no CUDA provider here (%s): running on the CPU",
                       ", ".join(available))
    return ["CPUExecutionProvider"]


class OnnxEmbedder(_ModelFileEmbedder):
    """Embeds sources with an ONNX model (one input, first output (N, D)) on onnxruntime.

    Args:
        path: the ``.onnx`` file. version, dim: the version it embeds for.
        input_spec: the model's input (``image`` or ``array``); None reads the file's own.
        normalized: L2-normalise the outputs. device: ``cpu`` or ``cuda[:i]``.
        threads: onnxruntime's intra-op threads (None: its default, one per core).

    Raises:
        CompatkitError: onnxruntime is missing, the file is not ONNX, no input spec, or the
            model's declared input shape disagrees with the input spec.
    """

    kind = "onnx"

    def __init__(self, path: str | Path, *, version: str, dim: int,
                 input_spec: Mapping[str, Any] | None = None, normalized: bool = True,
                 device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE,
                 threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CompatkitError("onnx embedders need onnxruntime: pip install "
                                 "'compatkit[onnx]'") from None
        path = Path(path)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options,
                providers=onnx_providers(device, ort.get_available_providers()))
        except Exception as err:  # onnxruntime raises its own exception types
            raise CompatkitError(f"{path} is not an ONNX model onnxruntime can load: "
                                 f"{str(err).strip().splitlines()[0]}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise CompatkitError(f"ONNX model {path} takes {len(inputs)} inputs "
                                 f"({', '.join(i.name for i in inputs)}); an embedder takes one")
        self.input_name = inputs[0].name
        if input_spec is None:
            meta = self.session.get_modelmeta().custom_metadata_map
            input_spec = _stored_input(path, meta.get(EXPORT_INPUT_KEY))
        declared = list(inputs[0].shape)
        if declared and isinstance(declared[0], int) and declared[0] > 0:
            batch_size = min(batch_size, declared[0])  # a model exported for a fixed batch
        super().__init__(path, version=version, dim=dim, input_spec=input_spec,
                         normalized=normalized, batch_size=batch_size)
        self._check_declared(declared, [o.shape for o in self.session.get_outputs()])

    def _check_declared(self, shape: list[Any], outputs: list[list[Any]]) -> None:
        if self.input["kind"] == "image" and len(shape) == 4:
            c, h, w = shape[1:]
            if isinstance(c, int) and c != self.input["in_chans"]:
                raise CompatkitError(f"ONNX model {self.path} takes {c}-channel images, the "
                                     f"input spec says {self.input['in_chans']} (channels)")
            size = self.input["image_size"]
            if size is not None and isinstance(h, int) and isinstance(w, int) and (
                    (h, w) != (size, size)):
                raise CompatkitError(f"ONNX model {self.path} takes {h}×{w}px images, the "
                                     f"input spec says {size}×{size}px (image size)")
        out = outputs[0] if outputs else []
        if len(out) == 2 and isinstance(out[1], int) and out[1] != self.dim:
            raise CompatkitError(f"ONNX model {self.path} outputs {out[1]}-dimensional "
                                 f"embeddings, but version {self.version!r} is registered "
                                 f"with dim {self.dim}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


class TorchScriptEmbedder(_ModelFileEmbedder):
    """Embeds sources with a TorchScript module (``forward(x) -> (N, D)``, or a tuple whose
    first element is that).

    Args: as ``OnnxEmbedder``; ``device`` is any torch device.

    Raises:
        CompatkitError: the file is not TorchScript, or no input spec.
    """

    kind = "torchscript"

    def __init__(self, path: str | Path, *, version: str, dim: int,
                 input_spec: Mapping[str, Any] | None = None, normalized: bool = True,
                 device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        import torch

        path = Path(path)
        extra = {EXPORT_INPUT_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is what it is
                self.module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except (RuntimeError, ValueError) as err:
            raise CompatkitError(f"{path} is not a TorchScript file torch.jit can load: "
                                 f"{str(err).strip().splitlines()[0]}") from None
        self.module.eval()
        self.device = device
        if input_spec is None:
            input_spec = _stored_input(path, extra[EXPORT_INPUT_FILE] or None)
        super().__init__(path, version=version, dim=dim, input_spec=input_spec,
                         normalized=normalized, batch_size=batch_size)

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(batch).to(self.device))
        if isinstance(out, tuple | list):
            out = out[0]
        return out.float().cpu().numpy()


def _stored_input(path: Path, stored: str | bytes | None) -> dict[str, Any]:
    """The input spec a file carries (written by ``compatkit export``)."""
    if not stored:
        raise CompatkitError(f"{path} carries no compatkit input spec: give one (image size, "
                             "channels, mean, std, or raw arrays)")
    try:
        value = json.loads(stored)
        return check_input({"kind": "image", **value} if "kind" not in value else value)
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise CompatkitError(f"{path} carries a malformed input spec: {err}") from None


# ------------------------------------------------------------------ python factories


def load_factory(path: str, *,
                 what: str = "python embedder") -> tuple[Callable[..., Any], Path | None]:
    """The callable named ``package.module:factory`` and the file of its module (``what``
    names it in errors).

    Raises:
        ValueError: not of the form ``module:attribute``.
        CompatkitError: the module cannot be imported, lacks the attribute, or it is not
            callable.
    """
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"a {what} is 'package.module:factory', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CompatkitError(f"{what} {path!r}: module {module_name!r} cannot be "
                             f"imported ({err})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CompatkitError(f"{what} {path!r}: module {module_name!r} has no "
                                 f"attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CompatkitError(f"{what} {path!r} names a {type(obj).__name__}, not a "
                             "callable factory")
    file = getattr(module, "__file__", None)
    return obj, (Path(file).resolve() if file else None)


class FactoryEmbedder:
    """The object a ``package.module:factory`` returns, checked and wrapped as an embedder.

    The object needs ``embed_sources(sources) -> (n, dim)``; a ``dim`` attribute, when it has
    one, must equal the version's.

    Raises:
        CompatkitError: the factory cannot be found or called with ``kwargs``, or returns an
            object without ``embed_sources`` or with another ``dim``.
    """

    def __init__(self, factory: str, *, version: str, dim: int,
                 kwargs: Mapping[str, Any] | None = None, normalized: bool = True) -> None:
        fn, self.module_file = load_factory(factory)
        try:
            self.inner = fn(**dict(kwargs or {}))
        except TypeError as err:
            raise CompatkitError(f"python embedder {factory!r} cannot be called with kwargs "
                                 f"{dict(kwargs or {})!r}: {err}") from None
        if not callable(getattr(self.inner, "embed_sources", None)):
            raise CompatkitError(f"python embedder {factory!r} returned a "
                                 f"{type(self.inner).__name__} without embed_sources(sources)")
        own = getattr(self.inner, "dim", None)
        if own is not None and int(own) != dim:
            raise CompatkitError(f"python embedder {factory!r} embeds in dim {own}, but version "
                                 f"{version!r} is registered with dim {dim}")
        self.factory, self.version, self.dim, self.normalized = factory, version, dim, normalized

    def embed_sources(self, sources: Sequence[Source]) -> np.ndarray:
        out = np.asarray(self.inner.embed_sources(list(sources)), dtype=np.float32)
        if out.shape != (len(sources), self.dim):
            raise CompatkitError(f"python embedder {self.factory!r} returned shape {out.shape} "
                                 f"for {len(sources)} sources; version {self.version!r} "
                                 f"expects ({len(sources)}, {self.dim})")
        return l2_normalize(out) if self.normalized and len(out) else out


# ------------------------------------------------------------------ specs


def resolve_spec(embedder: Mapping[str, Any] | Any | None, *, version: str, dim: int,
                 normalized: bool = True) -> dict[str, Any]:
    """The spec to store for a version: an external embedder's absolute path, input spec and
    file checksums filled in, after building it once to check it embeds in ``dim``.

    ``embedder``: a JSON spec, an object with ``spec()`` (``HashEmbedder``), or None.

    Raises:
        ValueError: an unknown kind or field.
        CompatkitError: a missing file, an unloadable model, a wrong input spec, an output
            dimension other than ``dim``, or a python factory that does not resolve.
    """
    if embedder is None:
        return {"kind": "none"}
    spec = dict(embedder) if isinstance(embedder, Mapping) else dict(embedder.spec())
    kind = spec.get("kind")
    if kind not in EMBEDDER_KINDS:
        raise ValueError(f"embedder kind must be one of {', '.join(EMBEDDER_KINDS)}, got "
                         f"{kind!r}")
    if kind not in EXTERNAL_KINDS:
        return spec
    unknown = set(spec) - _SPEC_KEYS[kind]
    if unknown:
        raise ValueError(f"a {kind} embedder takes {', '.join(sorted(_SPEC_KEYS[kind]))}; "
                         f"unknown: {', '.join(sorted(unknown))}")
    if kind == "python":
        if not isinstance(spec.get("factory"), str):
            raise ValueError(f"a python embedder needs factory 'package.module:factory', got "
                             f"{spec.get('factory')!r}")
        kwargs = _parse_kwargs(spec.get("kwargs"))
        try:
            json.dumps(kwargs)
        except TypeError as err:
            raise ValueError(f"python embedder kwargs must be JSON: {err}") from None
        emb = FactoryEmbedder(spec["factory"], version=version, dim=dim, kwargs=kwargs,
                              normalized=normalized)
        files = {} if emb.module_file is None else {
            str(emb.module_file): file_sha256(emb.module_file)}
        return {"kind": "python", "factory": spec["factory"], "kwargs": kwargs, "files": files}
    if not isinstance(spec.get("path"), str | Path):
        raise ValueError(f"a {kind} embedder needs path, got {spec.get('path')!r}")
    path = Path(spec["path"]).expanduser().resolve()
    if not path.is_file():
        raise CompatkitError(f"{kind} model file {path} does not exist")
    batch_size = spec.get("batch_size", DEFAULT_BATCH_SIZE)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    input_spec = None if spec.get("input") is None else check_input(spec["input"])
    cls = OnnxEmbedder if kind == "onnx" else TorchScriptEmbedder
    emb = cls(path, version=version, dim=dim, input_spec=input_spec, normalized=normalized,
              batch_size=batch_size)
    emb.check()
    return {"kind": kind, "path": str(path), "input": emb.input, "batch_size": batch_size,
            "files": {str(path): file_sha256(path)}}


def verify_files(info: VersionInfo) -> None:
    """Refuse an embedder whose files are not those its version was registered with.

    Raises:
        EmbedderChangedError: a file is missing or its sha256 differs (file, recorded and
            actual checksums named).
    """
    for path, recorded in info.embedder.get("files", {}).items():
        if not Path(path).is_file():
            raise EmbedderChangedError(f"{path}, registered with version {info.name!r} "
                                       f"(sha256 {recorded}), is missing")
        actual = file_sha256(path)
        if actual != recorded:
            raise EmbedderChangedError(
                f"{path} changed since version {info.name!r} was registered: recorded sha256 "
                f"{recorded}, actual {actual}; an embedder never changes under a version's "
                "name: register the new file as a new version")


def build_embedder(info: VersionInfo, *, device: str = "cpu") -> Embedder:
    """Rebuild a version's embedder from its stored spec, any kind (files checked first).

    Raises:
        EmbedderChangedError: a file changed since registration.
        CompatkitError: the version has no embedder, or it cannot be built.
    """
    spec = info.embedder
    kind = spec.get("kind", "none")
    if kind not in EXTERNAL_KINDS:
        return embedder_from_spec(info, device=device)
    verify_files(info)
    if kind == "python":
        emb = FactoryEmbedder(spec["factory"], version=info.name, dim=info.dim,
                              kwargs=spec.get("kwargs"), normalized=info.normalized)
        recorded = set(spec.get("files", {}))
        if emb.module_file is not None and recorded and str(emb.module_file) not in recorded:
            raise EmbedderChangedError(
                f"python embedder {spec['factory']!r} of version {info.name!r} was imported "
                f"from {emb.module_file}, registered from {', '.join(sorted(recorded))}")
        return emb
    cls = OnnxEmbedder if kind == "onnx" else TorchScriptEmbedder
    return cls(spec["path"], version=info.name, dim=info.dim, input_spec=spec["input"],
               normalized=info.normalized, device=device,
               batch_size=int(spec.get("batch_size", DEFAULT_BATCH_SIZE)))
