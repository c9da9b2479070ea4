"""Resumable training state: weights, optimiser, method state and RNG in safetensors + JSON."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compatkit.artifacts import atomic_write_bytes
from compatkit.errors import CompatkitError

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


@dataclass(frozen=True)
class TrainState:
    """Where training stands after a completed epoch."""

    epoch: int
    global_step: int


def save_train_state(
    directory: Path, *, module: nn.Module, method: nn.Module, optimizer: torch.optim.Optimizer,
    generator: torch.Generator, state: TrainState,
) -> None:
    """Write the full resumable state into ``directory`` (replaced atomically as a whole)."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in module.state_dict().items():
        tensors[f"module.{k}"] = v.detach().cpu().contiguous()
    for k, v in method.state_dict().items():
        tensors[f"method.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in opt["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(idx), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.augment"] = generator.get_state().cpu()
    meta = {"epoch": state.epoch, "global_step": state.global_step,
            "param_groups": opt["param_groups"], "optim_scalars": opt_scalars}
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / STATE_TENSORS))
    atomic_write_bytes(tmp / STATE_JSON, json.dumps(meta).encode())
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_train_state(
    directory: Path, *, module: nn.Module, method: nn.Module, optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> TrainState:
    """Restore what ``save_train_state`` wrote; a corrupt or mismatched state raises clearly."""
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
        meta = json.loads((directory / STATE_JSON).read_text())
    except (SafetensorError, OSError, ValueError) as err:
        raise CompatkitError(f"cannot resume from {directory}: corrupt training state ({err})") \
            from None

    def part(prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix)
        return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        module.load_state_dict(part("module."))
        method.load_state_dict(part("method."), strict=False)
    except RuntimeError as err:
        raise CompatkitError(f"cannot resume from {directory}: state does not match the "
                             f"configured model ({err})") from None
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in part("optim.").items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    for idx, scalars in meta["optim_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.augment"].to(generator.get_state().device))
    return TrainState(int(meta["epoch"]), int(meta["global_step"]))
