"""Training throughput of the real BCT loop next to the bare compute of the same step.

The loop's images/s (data indexing, batched augmentation, old-model forward, loss, optimiser
step) is read from ``history.json`` of a real ``compatkit.train`` run (steady-state epochs);
the bare step runs the same old forward + new forward/backward + optimiser step on tensors
already in memory. Goal: loop time per image at most 1.1× the bare compute. With ``--nproc``
the same BCT run is repeated by ``compatkit train --nproc N`` (DDP, gloo on CPU; one torch
thread per process; per-process batch = global batch / N) and its images/s printed per N.

    python benchmarks/train_step.py [--epochs 3] [--images-per-class 40] [--threads 2] \
        [--nproc 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from compatkit.artifacts import load_module
from compatkit.methods import MethodBatch, MethodContext, create_method, method_config_from_dict
from compatkit.train.config import load_config
from compatkit.train.loop import load_frozen, train

MODEL = ["model.backbone=resnet18_cifar", "model.width=0.25", "model.embed_dim=128",
         "model.classifier=cosine", "train.batch_size=128", "train.progress=false",
         "eval.enabled=false"]


def bare_step_seconds(new, old, steps: int, batch_size: int, in_chans: int, size: int,
                      class_ids: tuple[int, ...], old_manifest) -> float:
    """Median seconds of one BCT step on pre-made tensors (no data pipeline)."""
    images = torch.randn(batch_size, in_chans, size, size)
    labels = torch.randint(0, len(class_ids), (batch_size,))
    ctx = MethodContext(model=new, forward=new, old_model=old, old_manifest=old_manifest,
                        class_ids=class_ids, device=torch.device("cpu"), epochs=1,
                        train_batches=lambda: iter([(images, labels)]))
    method = create_method(method_config_from_dict({"name": "bct"}), ctx)
    method.on_train_start()
    opt = torch.optim.SGD(new.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    new.train()
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        out = method.step(MethodBatch(images, labels, 0, i))
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images-per-class", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nproc", default="", help="e.g. 1,2: also time DDP runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = [f"data.options={{images_per_class: {args.images_per_class}}}"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_run = train(load_config(None, [*MODEL, *data, "name=old", "data.side=old",
                                           "train.epochs=1"]), tmp / "old")
        run = train(load_config(None, [*MODEL, *data, "name=bct", "method={name: bct}",
                                       f"train.epochs={args.epochs}",
                                       f"old_model={old_run.artifact_dir}"]), tmp / "bct")
        steady = run.history[1:] or run.history
        loop_ips = statistics.median(h["images_per_second"] for h in steady)
        old, old_manifest = load_frozen(old_run.artifact_dir, "cpu")
        new, manifest = load_module(run.artifact_dir)
        spec = manifest.input
        bs = 128
        bare = bare_step_seconds(new, old, 20, bs, spec.in_chans, spec.image_size,
                                 manifest.class_ids, old_manifest)
        bare_ips = bs / bare
        ddp = {int(n): ddp_images_per_second(int(n), args.epochs, data, old_run.artifact_dir,
                                             tmp / f"ddp{n}")
               for n in args.nproc.split(",") if n}
    print(f"threads={args.threads} batch={bs} images={run.manifest.data['train_images']} "
          f"model=resnet18_cifar w0.25 d128 (torch {torch.__version__})")
    print("| what | images/s | time per image (ms) |")
    print("|---|---:|---:|")
    print(f"| real BCT loop (data + augmentation + old fwd + loss + step) | {loop_ips:.0f} | "
          f"{1000 / loop_ips:.3f} |")
    print(f"| bare compute (old fwd + new fwd/bwd + step, tensors in memory) | {bare_ips:.0f} | "
          f"{1000 / bare_ips:.3f} |")
    print(f"| ratio loop / bare (goal ≤ 1.10) | {bare_ips / loop_ips:.3f} | |")
    if ddp:
        print()
        print("| processes (DDP, 1 thread each, global batch 128) | images/s | speed-up |")
        print("|---:|---:|---:|")
        for n, ips in ddp.items():
            print(f"| {n} | {ips:.0f} | {ips / ddp[min(ddp)]:.2f}× |")


def ddp_images_per_second(nproc: int, epochs: int, data: list[str], old: Path,
                          out: Path) -> float:
    """Median steady-epoch images/s of ``compatkit train --nproc N`` on the same BCT run."""
    overrides = [*MODEL, *data, "name=bct", "method={name: bct}", f"train.epochs={epochs}",
                 f"train.batch_size={128 // nproc}", f"old_model={old}"]
    cmd = [sys.executable, "-m", "compatkit", "train", "--out", str(out), "--nproc", str(nproc)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    history = json.loads((out / "history.json").read_text())
    return statistics.median(h["images_per_second"] for h in history[1:] or history)


if __name__ == "__main__":
    main()
