"""Initial weights from outside a run: a compatkit artifact, a state dict or a TorchScript file.

``load_initial_weights(module, path)`` copies every tensor of the source whose name and shape
match the module (a backbone-only source matches under ``backbone.``); the module's other
tensors keep their fresh initialisation. A classifier of another size (a model trained on other
classes) is skipped; any other tensor that does not fit is an error, so a wrong architecture
never trains from half-loaded weights. The result records the source and its sha256 for the
run manifest.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from compatkit.artifacts import MANIFEST_NAME, WEIGHTS_NAME, file_sha256, load_state
from compatkit.errors import CompatkitError

logger = logging.getLogger(__name__)

InitKind = Literal["artifact", "state_dict", "torchscript"]
#: Tensors that may differ in shape between the source and the model (skipped, kept fresh).
RESIZABLE_PREFIXES = ("classifier.",)


@dataclass(frozen=True)
class InitialWeights:
    """Where a run's initial weights came from: the file read, its sha256, what it was, and
    how many tensors were copied (``skipped``: resizable tensors of another shape)."""

    path: str
    sha256: str
    kind: InitKind
    loaded: int
    skipped: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The JSON form written into ``run.json``."""
        return {**asdict(self), "skipped": list(self.skipped)}


def read_initial_state(path: str | Path) -> tuple[dict[str, torch.Tensor], InitKind, Path]:
    """The tensors of an initial-weights source, its kind, and the file they were read from.

    ``path``: an artifact folder (or a run folder holding ``model/``), a ``.safetensors`` or
    ``torch.save`` state dict (optionally under a ``state_dict`` key), or a TorchScript file.

    Raises:
        CompatkitError: a missing path, or a file that holds no state dict.
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "model" if (path / "model" / MANIFEST_NAME).is_file() else path
        if not (folder / MANIFEST_NAME).is_file():
            raise CompatkitError(f"model.init {path} is a folder but not a compatkit artifact "
                                 f"or run folder ({MANIFEST_NAME} missing)")
        return dict(load_state(folder)), "artifact", folder / WEIGHTS_NAME
    if not path.is_file():
        raise CompatkitError(f"model.init {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(path)), "state_dict", path
        except (SafetensorError, OSError, ValueError) as err:
            raise CompatkitError(f"model.init {path} is not a readable safetensors file: "
                                 f"{err}") from None
    if _is_torchscript(path):
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as err:
            raise CompatkitError(f"model.init {path} is not a loadable TorchScript file: "
                                 f"{str(err).splitlines()[0]}") from None
        return dict(scripted.state_dict()), "torchscript", path
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises pickle, zip and runtime errors alike
        raise CompatkitError(f"model.init {path} is neither a state dict nor a TorchScript "
                             f"file: {str(err).splitlines()[0]}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CompatkitError(f"model.init {path} holds a {type(obj).__name__}, not a state dict "
                             "(a mapping of names to tensors)")
    return dict(obj), "state_dict", path


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with compiled ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name for name in zf.namelist())


def load_initial_weights(module: nn.Module, path: str | Path) -> InitialWeights:
    """Copy the matching tensors of ``path`` into ``module`` (see the module docstring).

    Raises:
        CompatkitError: an unreadable source, a source of which no tensor matches, or tensors
            of the source that the module lacks or holds in another shape (names listed).
    """
    state, kind, file = read_initial_state(path)
    target = module.state_dict()
    if not any(k in target for k in state) and hasattr(module, "backbone"):
        state = {f"backbone.{k}": v for k, v in state.items()}  # a backbone's own weights
    matched, skipped, misfits = {}, [], []
    for name, tensor in state.items():
        if name in target and target[name].shape == tensor.shape:
            matched[name] = tensor.to(dtype=target[name].dtype)
        elif name in target and name.startswith(RESIZABLE_PREFIXES):
            skipped.append(name)
        else:
            shape = tuple(target[name].shape) if name in target else "absent"
            misfits.append(f"{name} {tuple(tensor.shape)} (model: {shape})")
    if misfits or not matched:
        expected = ", ".join(list(target)[:3])
        detail = "; ".join(misfits[:5]) + (f"; ... {len(misfits) - 5} more"
                                           if len(misfits) > 5 else "")
        raise CompatkitError(f"model.init {path} does not fit the model: "
                             f"{detail or 'no tensor matches'} (the model's tensors are named "
                             f"like {expected})")
    module.load_state_dict({**target, **matched})
    if skipped:
        logger.info("model.init: kept fresh %s (other shape in %s)", ", ".join(skipped), path)
    return InitialWeights(str(Path(file).resolve()), file_sha256(file), kind, len(matched),
                          tuple(skipped))
