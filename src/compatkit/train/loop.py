"""The one training loop: every method plugs in through ``Method.step``.

Device, AMP and DDP are values of the run context, not separate code paths. A run folder holds
``config.yaml``, ``run.json`` (seed, code version, runtime, ``model.init``'s source and sha256),
``data.json`` (split manifest), ``history.json`` (per-epoch losses, lr, images/s),
``checkpoints/last`` (resumable state), ``model/`` (the artifact) and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from compatkit.artifacts import (
    InputSpec,
    Manifest,
    load_module,
    read_manifest,
    save_module,
    weights_digest,
)
from compatkit.data import Augmenter, EpochSampler, normalize, sequential_batches
from compatkit.errors import CompatkitError
from compatkit.eval.metrics import retrieval_metrics
from compatkit.inference import embed_images
from compatkit.methods import METHODS, Method, MethodBatch, MethodContext, create_method
from compatkit.models import FrozenModel
from compatkit.models.initial_weights import InitialWeights, load_initial_weights
from compatkit.train.checkpoint import TrainState, load_train_state, save_train_state
from compatkit.train.config import RunConfig, config_to_yaml
from compatkit.train.prepare import PreparedData, prepare_data
from compatkit.train.progress import ProgressReporter
from compatkit.train.runtime import RunContext, all_gather_cat, init_runtime, seed_everything
from compatkit.train.schedule import cosine_with_warmup
from compatkit.version import code_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    artifact_dir: Path
    manifest: Manifest
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def load_frozen(path: str | Path, device: torch.device) -> tuple[FrozenModel, Manifest]:
    """A trained artifact as a frozen model (eval mode, no gradient) plus its manifest."""
    module, manifest = load_module(path, device=device)
    return FrozenModel(module), manifest


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False) -> RunResult:
    """Train ``cfg.method`` per ``cfg`` into ``out_dir``; with ``resume`` continue from its last
    checkpoint. Returns the artifact and the final retrieval metrics."""
    out_dir = Path(out_dir)
    rt = init_runtime(cfg.train.device, cfg.train.amp)
    seed_everything(cfg.train.seed, rt.rank)
    data = prepare_data(cfg.data)
    old_model, old_manifest = (
        load_frozen(cfg.old_model, rt.device) if cfg.old_model else (None, None)
    )
    frozen_loaded = {role: load_frozen(path, rt.device) for role, path in cfg.frozen_models.items()}
    frozen = {role: model for role, (model, _) in frozen_loaded.items()}
    frozen_manifests = {role: manifest for role, (_, manifest) in frozen_loaded.items()}
    spec = _input_spec(data, old_manifest)

    method_cls = METHODS.get(cfg.method.name)
    # The old model joins the frozen roles: a transformation sizes itself from it.
    build_frozen = frozen if old_model is None else {**frozen, "old": old_model}
    module = method_cls.build_trained_module(
        cfg.model, cfg.method, num_classes=len(data.class_ids), in_chans=spec.in_chans,
        frozen=build_frozen,
    ).to(rt.device)
    initial = load_initial_weights(module, cfg.model.init) if cfg.model.init else None
    wrapped: nn.Module = (
        DistributedDataParallel(module, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                else None)
        if rt.distributed else module
    )
    images = torch.from_numpy(data.train.images)
    labels = torch.from_numpy(data.labels)
    if rt.device.type == "cuda":
        images, labels = images.to(rt.device), labels.to(rt.device)

    def train_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in sequential_batches(len(images), cfg.train.embed_batch_size):
            idx_t = torch.from_numpy(idx).to(images.device)
            x = normalize(images[idx_t].to(rt.device), spec.mean, spec.std)
            yield x, labels[idx_t].to(rt.device)

    augment = Augmenter(spec.mean, spec.std, crop_padding=cfg.data.crop_padding,
                        flip=cfg.data.flip, affine_rotation=cfg.data.affine_rotation,
                        affine_scale=cfg.data.affine_scale, affine_shift=cfg.data.affine_shift)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.train.seed * 1009 + rt.rank)
    ctx = MethodContext(
        model=module, forward=wrapped, old_model=old_model, old_manifest=old_manifest,
        class_ids=data.class_ids, device=rt.device, epochs=cfg.train.epochs,
        train_batches=train_batches, gather=all_gather_cat, frozen=frozen,
        rank=rt.rank, world_size=rt.world_size, augment=lambda raw: augment(raw, generator),
    )
    method = create_method(cfg.method, ctx).to(rt.device)
    params = [p for p in module.parameters() if p.requires_grad] + method.extra_parameters()
    optimizer = _optimizer(cfg, params)
    sampler = EpochSampler(len(images), cfg.train.batch_size, shuffle=True, drop_last=True,
                           seed=cfg.train.seed, rank=rt.rank, world_size=rt.world_size)
    if sampler.num_batches == 0:
        raise CompatkitError(f"training set of {len(images)} images is smaller than one batch "
                             f"of {cfg.train.batch_size} per process")
    total_steps = cfg.train.epochs * sampler.num_batches
    warmup_steps = round(cfg.optim.warmup_epochs * sampler.num_batches)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)

    state_dir = out_dir / "checkpoints" / "last"
    method.on_train_start()
    state = TrainState(epoch=0, global_step=0)
    if resume and (state_dir / "state.json").is_file():
        state = load_train_state(state_dir, module=module, method=method, optimizer=optimizer,
                                 generator=generator)
        log.info("resumed from %s at epoch %d", state_dir, state.epoch)
    elif rt.is_main:
        _write_run_files(out_dir, cfg, rt, data, initial)

    reporter = ProgressReporter(enabled=cfg.train.progress and rt.is_main,
                                total=total_steps, done=state.global_step)
    history = _read_history(out_dir)[: state.epoch]
    step = state.global_step
    with reporter:
        for epoch in range(state.epoch, cfg.train.epochs):
            method.on_epoch_start(epoch)
            module.train()
            epoch_parts: dict[str, float] = {}
            epoch_images = 0
            epoch_started = time.perf_counter()
            for idx in sampler.batches(epoch):
                lr = cosine_with_warmup(
                    step, total_steps=total_steps, warmup_steps=warmup_steps,
                    base_lr=cfg.optim.lr, warmup_start_ratio=cfg.optim.warmup_start_ratio,
                    min_lr_ratio=cfg.optim.min_lr_ratio,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                started = time.perf_counter()
                idx_t = torch.from_numpy(idx).to(images.device)
                raw = images[idx_t].to(rt.device, non_blocking=True)
                x = augment(raw, generator)
                y = labels[idx_t].to(rt.device, non_blocking=True)
                with torch.autocast(rt.device.type, dtype=rt.amp_dtype,
                                    enabled=rt.amp_dtype is not None):
                    out = method.step(MethodBatch(x, y, epoch, step, raw))
                if not torch.isfinite(out.total):
                    raise CompatkitError(f"loss is not finite at epoch {epoch} step {step}: "
                                         f"{out.parts}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.total).backward()
                if cfg.optim.grad_clip_norm is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                epoch_images += len(idx) * rt.world_size
                logged = _global_mean({"loss": out.total.item(), **out.parts}, rt)
                for key, value in logged.items():
                    epoch_parts[key] = epoch_parts.get(key, 0.0) + value
                reporter.update(epoch=epoch, loss=logged["loss"], parts=logged, lr=lr,
                                images=len(idx) * rt.world_size,
                                seconds=time.perf_counter() - started)
            seconds = time.perf_counter() - epoch_started
            history.append({
                "epoch": epoch, "lr": lr, "seconds": round(seconds, 3),
                "images_per_second": round(epoch_images / seconds, 1),
                **{k: v / sampler.num_batches for k, v in epoch_parts.items()},
            })
            last_epoch = epoch + 1 == cfg.train.epochs
            if rt.is_main:
                (out_dir / "history.json").write_text(json.dumps(history, indent=1))
            if rt.is_main and ((epoch + 1) % cfg.train.checkpoint_every == 0 or last_epoch):
                save_train_state(state_dir, module=module, method=method, optimizer=optimizer,
                                 generator=generator, state=TrainState(epoch + 1, step))
            if rt.distributed:
                torch.distributed.barrier()

    metrics = (evaluate_run(method, spec, data, cfg, rt)
               if cfg.eval.enabled and rt.is_main else {})
    relations = method_cls.relations(old_manifest, frozen_manifests)
    manifest = _artifact_manifest(cfg, method_cls, method.trained_module(), spec, data,
                                  relations, metrics)
    artifact_dir = out_dir / "model"
    if rt.is_main:
        save_module(artifact_dir, method.trained_module(), manifest)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return RunResult(out_dir, artifact_dir, manifest, metrics, history)


def train_or_reuse(cfg: RunConfig, out_dir: str | Path) -> RunResult:
    """``train`` unless ``out_dir`` already holds a model trained with exactly this config;
    a run of this config that was interrupted resumes from its last checkpoint."""
    out_dir = Path(out_dir)
    artifact = out_dir / "model"
    if (artifact / "manifest.json").is_file():
        manifest = read_manifest(artifact)
        if manifest.config == cfg.model_dump(mode="json"):
            log.info("reusing %s (trained with the same config)", artifact)
            return RunResult(out_dir, artifact, manifest, manifest.metrics,
                             _read_history(out_dir))
    saved = out_dir / "config.yaml"
    interrupted = (out_dir / "checkpoints" / "last" / "state.json").is_file()
    if interrupted and saved.is_file() and saved.read_text() == config_to_yaml(cfg):
        log.info("resuming %s (interrupted with the same config)", out_dir)
        return train(cfg, out_dir, resume=True)
    return train(cfg, out_dir)


def evaluate_run(
    method: Method, spec: InputSpec, data: PreparedData, cfg: RunConfig, rt: RunContext,
) -> dict[str, Any]:
    """Leave-one-out retrieval on the held-out test set, for every gallery the method names."""
    kwargs = {"batch_size": cfg.train.embed_batch_size, "device": rt.device,
              "amp_dtype": rt.amp_dtype}
    images = data.test.images
    embedders = method.evaluation_embedders()
    evaluate = _metric_fn(cfg, data.test.labels)
    query = embed_images(embedders.query, images, spec, **kwargs)
    metrics: dict[str, Any] = {}
    for name, embed in embedders.galleries.items():
        gallery = query if embed is embedders.query else embed_images(embed, images, spec,
                                                                        **kwargs)
        metrics[name] = evaluate(query, gallery)
    if embedders.old is not None:
        old = embed_images(embedders.old, images, spec, **kwargs)
        metrics["old_old"] = evaluate(old, old)
    return metrics


def _metric_fn(cfg: RunConfig, labels: np.ndarray):
    def evaluate(query: np.ndarray, gallery: np.ndarray) -> dict[str, float]:
        return retrieval_metrics(query, labels, gallery, labels, metrics=cfg.eval.metrics,
                                 distance=cfg.eval.distance, exclude_self=True,
                                 chunk_size=cfg.eval.chunk_size)
    return evaluate


def _input_spec(data: PreparedData, old_manifest: Manifest | None) -> InputSpec:
    in_chans = int(data.train.images.shape[1])
    spec = InputSpec(image_size=int(data.train.images.shape[2]), in_chans=in_chans,
                     mean=data.mean, std=data.std)
    if old_manifest is None or old_manifest.input is None:
        return spec
    old = old_manifest.input
    if (old.in_chans, old.image_size) != (spec.in_chans, spec.image_size):
        raise CompatkitError(
            f"the old model takes {old.in_chans}×{old.image_size}px images but this run's data "
            f"has {spec.in_chans}×{spec.image_size}px"
        )
    return old  # the new model adopts the old model's input normalisation


def _optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def _global_mean(values: dict[str, float], rt: RunContext) -> dict[str, float]:
    """Loss parts averaged over processes (the number one process would log for the global
    batch); unchanged in one process."""
    if not rt.distributed:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return dict(zip(values, (t / rt.world_size).tolist(), strict=True))


def _read_history(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _write_run_files(out_dir: Path, cfg: RunConfig, rt: RunContext, data: PreparedData,
                     initial: InitialWeights | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config_to_yaml(cfg))
    run = {"seed": cfg.train.seed, "code_version": code_version(),
           "device": str(rt.device), "amp": str(rt.amp_dtype), "world_size": rt.world_size,
           "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "init": None if initial is None else initial.as_dict()}
    (out_dir / "run.json").write_text(json.dumps(run, indent=2))
    (out_dir / "data.json").write_text(json.dumps(data.manifest, indent=2))


def _artifact_manifest(
    cfg: RunConfig, method_cls: type, module: nn.Module, spec: InputSpec, data: PreparedData,
    relations: dict[str, Any], metrics: dict[str, Any],
) -> Manifest:
    state = module.state_dict()
    embed_dim = getattr(module, "embed_dim", None) or module.d_out
    return Manifest(
        kind=method_cls.artifact_kind,
        model_version=f"{cfg.name}-{weights_digest(state)}",
        spec=dict(module.spec),
        embed_dim=int(embed_dim),
        normalized=bool(getattr(module, "normalize", False)),
        class_ids=data.class_ids,
        input=spec,
        method=cfg.method.name,
        **relations,
        data=data.manifest,
        metrics=metrics,
        seed=cfg.train.seed,
        code_version=code_version(),
        config=cfg.model_dump(mode="json"),
    )
