"""Embedding throughput of one model three ways: ONNX (onnxruntime), TorchScript and native
compatkit, side by side.

A random resnet18_cifar (width 0.25, d=128, 32-px RGB; ``common.random_model_artifacts``) is
exported with ``compatkit.export`` to ONNX and TorchScript and registered as index versions;
each way embeds the same decoded uint8 images (normalisation included, image decoding left
out: it is the same for all three) in batches of ``--batch-size``, with ``--threads`` intra-op
threads. images/s is the best of ``--repeats`` timed passes after one warm-up pass; the largest
difference from the native vectors is printed too.

    python benchmarks/embed_throughput.py [--images 2048] [--batch-size 64] [--threads 1] \
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common import Stopwatch, random_model_artifacts
from compatkit.artifacts import read_manifest
from compatkit.export import export_model
from compatkit.index.embedders import ArtifactEmbedder
from compatkit.index.external_embedders import (
    OnnxEmbedder,
    TorchScriptEmbedder,
    prepare_images,
)


def images_per_second(embed: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                      batch_size: int, repeats: int) -> tuple[float, np.ndarray]:
    """Best images/s over ``repeats`` passes (after a warm-up pass) and the vectors."""
    def one_pass() -> np.ndarray:
        return np.concatenate([embed(images[i:i + batch_size])
                               for i in range(0, len(images), batch_size)])

    vectors = one_pass()
    best = 0.0
    for _ in range(repeats):
        with Stopwatch() as sw:
            one_pass()
        best = max(best, len(images) / sw.wall)
    return best, vectors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = random_model_artifacts(Path(tmp))["new"]
        spec = read_manifest(artifact).input
        onnx = export_model(artifact, Path(tmp) / "m.onnx", format="onnx")
        ts = export_model(artifact, Path(tmp) / "m.pt", format="torchscript")
        images = np.random.default_rng(0).integers(
            0, 256, (args.images, spec.in_chans, spec.image_size, spec.image_size),
            dtype=np.uint8)
        input_spec = {"kind": "image", "image_size": spec.image_size,
                      "in_chans": spec.in_chans, "mean": list(spec.mean), "std": list(spec.std)}
        native = ArtifactEmbedder(artifact, batch_size=args.batch_size)
        onnx_emb = OnnxEmbedder(onnx, version="v", dim=128, input_spec=input_spec,
                                threads=args.threads)
        ts_emb = TorchScriptEmbedder(ts, version="v", dim=128, input_spec=input_spec)
        ways = {
            "native compatkit (PyTorch eager)": native.embed_images,
            "TorchScript (torch.jit)": lambda x: ts_emb.embed_inputs(prepare_images(x, input_spec)),
            "ONNX (onnxruntime, CPU provider)": lambda x: onnx_emb.embed_inputs(
                prepare_images(x, input_spec)),
        }
        results = {name: images_per_second(fn, images, args.batch_size, args.repeats)
                   for name, fn in ways.items()}
    reference = results["native compatkit (PyTorch eager)"][1]
    print(f"resnet18_cifar width 0.25, d=128, {spec.image_size}px, {args.images} images, "
          f"batch {args.batch_size}, {args.threads} thread(s)\n")
    print("| way | images/s | max abs diff vs native |\n|---|---:|---:|")
    for name, (ips, vectors) in results.items():
        print(f"| {name} | {ips:.0f} | {np.abs(vectors - reference).max():.1e} |")


if __name__ == "__main__":
    main()
