"""Typed, validated run configs: defaults in code → YAML recipe → ``--set`` overrides → frozen.

Every section refuses unknown keys. The resolved config is written next to each run's outputs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from compatkit.config_base import StrictModel
from compatkit.errors import CompatkitError
from compatkit.methods import MethodConfig, method_config_from_dict


class DataConfig(StrictModel):
    """Which images a run trains on: dataset, evaluation hold-out and the old/new split side."""

    name: str = "synthetic"
    root: str | None = None
    image_size: int | None = Field(32, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)
    scenario: Literal["extended_data", "extended_class", "open_data", "open_class"] = (
        "extended_class"
    )
    old_ratio: float = Field(0.3, gt=0.0, lt=1.0)
    split_seed: int = 666
    side: Literal["old", "new"] = "new"
    test_class_ratio: float = Field(
        0.3, ge=0.0, lt=1.0,
        description="share of classes held out for open-set retrieval when the dataset has no "
                    "official test split",
    )
    train_per_class: int | None = Field(
        None, gt=0,
        description="keep at most this many training-pool images per class (seeded), for "
                    "CPU-sized runs on large datasets; the test set is never reduced",
    )
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    affine_rotation: float = Field(0.0, ge=0.0, le=180.0,
                                   description="random rotation of ± this many degrees")
    affine_scale: float = Field(0.0, ge=0.0, lt=1.0,
                                description="random scaling by a factor in 1 ± this")
    affine_shift: float = Field(0.0, ge=0.0, description="random shift of ± this many pixels")


class ModelConfig(StrictModel):
    """The embedding model: backbone (a registered name or ``timm:NAME``), width, embedding
    head, classifier and optional initial weights."""

    backbone: str = "resnet18_cifar"
    width: float = Field(0.25, gt=0.0)
    embed_dim: int = Field(128, gt=0)
    pooling: Literal["avg", "gem"] = "avg"
    bn_neck: bool = False
    normalize: bool = True
    classifier: str = "linear"
    classifier_kwargs: dict[str, Any] = Field(default_factory=dict)
    init: str | None = Field(
        None, description="initial weights: a compatkit artifact or run folder, a state dict "
                          "(.safetensors, .pt) or a TorchScript backbone "
                          "(compatkit.models.initial_weights)",
    )


class OptimConfig(StrictModel):
    """Optimiser and cosine schedule with linear warm-up (per step)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    warmup_start_ratio: float = Field(1e-3, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(1e-2, ge=0.0, le=1.0)
    grad_clip_norm: float | None = Field(None, gt=0.0)


class TrainConfig(StrictModel):
    """Loop settings: epochs, batch, device, precision, seed, checkpoints, logging."""

    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=1)
    device: str = "auto"
    amp: bool | Literal["auto"] = "auto"
    seed: int = 0
    checkpoint_every: int = Field(1, ge=1)
    progress: bool = True
    embed_batch_size: int = Field(512, gt=0)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto" and not value.startswith(("cpu", "cuda", "mps")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:i]' or 'mps', got {value!r}")
        return value


class EvalConfig(StrictModel):
    """End-of-training retrieval evaluation on the held-out test set (leave-one-out)."""

    metrics: tuple[str, ...] = ("map", "cmc@1", "cmc@5")
    distance: Literal["cosine", "l2"] = "cosine"
    chunk_size: int = Field(4096, gt=0)
    enabled: bool = True


class RunConfig(StrictModel):
    """One training run: all sections plus the frozen models it builds on."""

    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: SerializeAsAny[MethodConfig] = Field(
        default_factory=lambda: method_config_from_dict({"name": "independent"})
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    old_model: str | None = None
    frozen_models: dict[str, str] = Field(default_factory=dict)

    @field_validator("method", mode="before")
    @classmethod
    def _method_by_name(cls, value: Any) -> MethodConfig:
        return method_config_from_dict(value)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.train.amp is True and self.train.device.startswith("cpu"):
            raise ValueError("train.amp=true needs a CUDA device; use amp: auto or false on CPU")
        return self


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted = "a.b.c"``, creating mappings on the way."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise CompatkitError(f"cannot set {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` → ("train.epochs", 3); the value is parsed as YAML."""
    if "=" not in text:
        raise CompatkitError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve a run config from ``base`` ← YAML file ← ``key.path=value`` overrides, once."""
    tree: dict[str, Any] = merge_trees(base or {}, {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CompatkitError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise CompatkitError(f"config file {path} must hold a mapping, got {type(loaded)}")
        tree = merge_trees(tree, loaded)
    for item in overrides:
        key, value = parse_override(item)
        set_path(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise CompatkitError(f"invalid config: {_short(err)}") from None


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what is written into every run folder)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _short(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new nested mapping: ``base`` with ``update`` merged in, section by section."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
