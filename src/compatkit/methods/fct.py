"""FCT: a forward transformation from old embeddings (plus side-information) to the new space.

Forward Compatible Training (fct-fastfill-peers.md §1.1, §1.4, §1.5): with φ_old, φ_new and the
side-information model ψ frozen, train h so that h(φ_old(x), ψ(x)) ≈ φ_new(x) by MSE on the
augmented training images, then upgrade the stored gallery without images
(``compatkit.feature_upgrade``).
The frozen features are what each model's ``embed`` returns, i.e. exactly the stored vectors.
From ``freeze_bn_epoch`` on (default half the epochs) the transformation trains in eval mode, so
BatchNorm uses and no longer updates its running statistics (ml-fct's ``switch_mode_to_eval``).

``TransformationMethod`` holds what FCT, FastFill and BiCT share: building the module from the
frozen models' dimensions, the BN switch, relations and evaluation embedders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from compatkit.methods.base import (
    EvalEmbedders,
    LossOutput,
    Method,
    MethodBatch,
    MethodConfig,
    MethodContext,
    register_method,
)


class TransformationConfig(MethodConfig):
    """Fields of every transformation method (subclasses add ``name``)."""

    inner: int = Field(2048, gt=0, description="mixer hidden width of the transformation MLP")
    freeze_bn_epoch: int | None = Field(
        None, ge=0, description="epoch from which BatchNorm runs in eval mode; None = half the "
                                "epochs (at least 1); >= epochs never")


def default_freeze_bn_epoch(epochs: int) -> int:
    """Half the epochs, as ml-fct (epoch 40 of 80), but never before the first epoch ends."""
    return max(1, epochs // 2)


class TransformationMethod(Method):
    """Base of FCT, FastFill and BiCT: trains a ``Transformation`` old (+ side) → new space.

    Needs the old model and ``frozen_models.new``; uses ``frozen_models.side`` (a side-info
    artifact) when ``uses_side_info`` and the run configures one.
    """

    needs_old_model: ClassVar[bool] = True
    artifact_kind: ClassVar[str] = "transformation"
    uses_side_info: ClassVar[bool] = True

    def __init__(self, cfg: TransformationConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        if "new" not in ctx.frozen:
            raise ValueError(f"{cfg.name} needs the new model: set frozen_models.new=PATH "
                             f"(frozen roles given: {sorted(ctx.frozen)})")
        self._bn_frozen = False

    @classmethod
    def build_trained_module(
        cls, model_cfg: Any, method_cfg: MethodConfig, *, num_classes: int, in_chans: int,
        frozen: dict[str, nn.Module],
    ) -> nn.Module:
        """A ``Transformation(d_old, d_new, d_side)`` sized from the frozen models.

        ``frozen`` must hold ``"old"`` and ``"new"`` (and ``"side"`` for side-information).
        Its ``normalize`` attribute copies the new model's, so the artifact manifest records
        ``normalized`` and upgraded vectors are L2-normalised like the new model's embeddings.
        """
        from compatkit.models import Transformation

        cfg = method_cfg if isinstance(method_cfg, TransformationConfig) else cls.config_cls()
        for role in ("old", "new"):
            if role not in frozen:
                raise ValueError(f"{cfg.name} needs the {role} model (set "
                                 f"{'old_model' if role == 'old' else 'frozen_models.new'}); "
                                 f"frozen roles given: {sorted(frozen)}")
        side = frozen.get("side") if cls.uses_side_info else None
        if not cls.uses_side_info and "side" in frozen:
            raise ValueError(f"{cfg.name} takes no side-information, but frozen_models.side is set")
        module = Transformation(
            int(frozen["old"].embed_dim), int(frozen["new"].embed_dim),
            d_side=None if side is None else int(side.embed_dim),
            inner=cfg.inner, sigma_dim=int(getattr(cfg, "sigma_dim", 0)),
        )
        module.normalize = bool(getattr(frozen["new"], "normalize", False))
        return module

    @classmethod
    def relations(cls, old_manifest: Any, frozen_manifests: dict[str, Any]) -> dict[str, Any]:
        """transforms_from = the old model's version, transforms_to = the new model's."""
        if old_manifest is None or "new" not in frozen_manifests:
            raise ValueError("a transformation needs the old and the new model's manifests")
        return {"transforms_from": old_manifest.model_version,
                "transforms_to": frozen_manifests["new"].model_version}

    @property
    def new_model(self) -> nn.Module:
        return self.ctx.frozen["new"]

    @property
    def side_model(self) -> nn.Module | None:
        return self.ctx.frozen.get("side") if self.uses_side_info else None

    @property
    def freeze_bn_epoch(self) -> int:
        """The first epoch trained with BatchNorm in eval mode."""
        cfg = self.cfg.freeze_bn_epoch
        return default_freeze_bn_epoch(self.ctx.epochs) if cfg is None else int(cfg)

    def on_train_start(self) -> None:
        t = self.ctx.model
        if self.ctx.old_model.embed_dim != t.d_old or self.new_model.embed_dim != t.d_new:
            raise ValueError(f"{self.cfg.name}: transformation maps {t.d_old} → {t.d_new} but the "
                             f"old/new models embed {self.ctx.old_model.embed_dim} / "
                             f"{self.new_model.embed_dim} dimensions")

    def on_epoch_start(self, epoch: int) -> None:
        self.apply_bn_mode(epoch)

    def apply_bn_mode(self, epoch: int) -> None:
        """Eval mode from ``freeze_bn_epoch`` on. Also called by every step, because the loop
        switches the module back to train mode after ``on_epoch_start``."""
        if epoch >= self.freeze_bn_epoch:
            self.ctx.model.train(False)  # the bare module: a DDP wrapper forwards to it

    def inputs(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Frozen old embeddings and side-information of an image batch (no gradient)."""
        old = self.ctx.old_model.embed(images)
        side = self.side_model
        return old, None if side is None else side.embed(images)

    def transform(self, images: Tensor) -> Tensor:
        """x ↦ h(φ_old(x), ψ(x)), normalised when the new space is (the upgraded gallery)."""
        old, side = self.inputs(images)
        out = self.ctx.model(old, side).embedding
        return F.normalize(out, dim=1) if getattr(self.ctx.model, "normalize", False) else out

    def evaluation_embedders(self) -> EvalEmbedders:
        """Query φ_new; galleries self = φ_new, transformed = h(φ_old, ψ), cross = φ_old."""
        self.ctx.model.train(False)
        query: Callable[[Tensor], Tensor] = self.new_model.embed
        old = self.ctx.old_model
        galleries: dict[str, Callable[[Tensor], Tensor]] = {
            "self": query, "transformed": self.transform
        }
        if old.embed_dim == self.new_model.embed_dim:
            galleries["cross"] = old.embed
        return EvalEmbedders(query, galleries, old.embed)

    def prediction(self, batch: MethodBatch) -> tuple[Tensor, Tensor | None, Tensor]:
        """(ĥ (B, d_new), log σ (B, sigma_dim) | None, target φ_new (B, d_new)) of a batch."""
        self.apply_bn_mode(batch.epoch)
        old, side = self.inputs(batch.images)
        target = self.new_model.embed(batch.images)
        out = self.ctx.forward(old, side)
        return out.embedding, out.log_sigma, target


class FCTConfig(TransformationConfig):
    name: Literal["fct"] = "fct"


@register_method("fct")
class FCT(TransformationMethod):
    """MSE between h(φ_old(x), ψ(x)) and φ_new(x); side-information when frozen_models.side."""

    config_cls = FCTConfig

    def step(self, batch: MethodBatch) -> LossOutput:
        pred, _, target = self.prediction(batch)
        loss = F.mse_loss(pred.float(), target.float())
        return LossOutput(loss, {"mse": loss.item()})


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """mean_d (pred − target)², per sample. Shapes: (B, D), (B, D) -> (B,)."""
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must be (B, D) of one shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    return (pred.float() - target.float()).pow(2).mean(dim=1)

