"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import time
from pathlib import Path


class Stopwatch:
    """Wall and CPU seconds of a block (``with Stopwatch() as sw: ...; sw.wall, sw.cpu``)."""

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def random_model_artifacts(work: Path) -> dict[str, Path]:
    """Two random resnet18_cifar (width 0.25, d=128) artifacts: ``old``, and ``new`` declared
    compatible with it; 32-px RGB input."""
    import torch

    from compatkit.artifacts import InputSpec, Manifest, save_module
    from compatkit.models import create_model

    spec = InputSpec(image_size=32, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    paths = {}
    for name, seed, compat in (("old", 0, ()), ("new", 1, ("old",))):
        torch.manual_seed(seed)
        model = create_model(backbone="resnet18_cifar", width=0.25, embed_dim=128,
                             num_classes=100).eval()
        paths[name] = save_module(work / name, model, Manifest(
            model_version=name, spec=model.spec, embed_dim=128, normalized=True,
            compatible_with=compat, input=spec))
    return paths


def print_quantities(rows: list[tuple[str, str]]) -> None:
    """Print (quantity, value) rows as a two-column markdown table."""
    width = max(len(name) for name, _ in rows)
    print(f"| {'quantity':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")
