"""Wall time of ``compatkit demo`` per dataset, and whether its ordering holds (issue 11, point 5).

Runs ``compatkit demo`` as a user would, one dataset after the other, and prints per dataset:
the wall time (goal: under 10 minutes on 2 cores), what the demo subsampled (its budget and its
test set), and the three cells of the ordering every demo must show: bct/old > old/old and
independent/old far below old/old (mAP; ``demo_ordering``).

The IDX dataset: ``--idx-root`` names a folder with real MNIST or Fashion-MNIST IDX files. With
``--idx-from-cifar10`` the script writes one instead from the CIFAR-10 images (grayscale,
centre 28 × 28, 60,000 images in the official IDX layout) and demos it as ``mnist``: a
60,000-image IDX dataset without a tuned recipe, for machines without MNIST.

    python benchmarks/demo_time.py --out runs/demo_time --datasets synthetic,omniglot,cifar10,idx \
        --omniglot-root ../shared/data/omniglot --cifar10-root ../shared/data/cifar10 \
        --idx-from-cifar10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from compatkit.data import load_dataset
from compatkit.data.idx import IDX_FILES, write_idx

#: ITU-R BT.601 luma weights (RGB -> gray).
LUMA = np.array([0.299, 0.587, 0.114])
GOAL_SECONDS = 600


def write_idx_from_cifar10(cifar10_root: str, out: Path) -> Path:
    """CIFAR-10 (train and test) as MNIST-style IDX files: grayscale, centre 28 × 28 crop."""
    splits = load_dataset("cifar10", cifar10_root, image_size=32)
    out.mkdir(parents=True, exist_ok=True)
    for part, ds in (("train", splits.train), ("test", splits.test)):
        gray = np.tensordot(LUMA, ds.images.astype(np.float64), axes=([0], [1]))
        images = np.clip(np.rint(gray[:, 2:30, 2:30]), 0, 255).astype(np.uint8)
        write_idx(out / IDX_FILES[f"{part}_images"], images)
        write_idx(out / IDX_FILES[f"{part}_labels"], ds.labels.astype(np.uint8))
    return out


def run_demo(dataset: str, root: str | None, out: Path) -> dict[str, Any]:
    """Run ``compatkit demo`` in a subprocess; its wall time and the cells of its ordering."""
    cmd = [sys.executable, "-m", "compatkit", "demo", "--dataset", dataset, "--out", str(out),
           "--no-progress"]
    if root is not None:
        cmd += ["--root", root]
    print("$ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    budget = metrics.get("budget")
    return {"dataset": dataset, "wall_seconds": round(wall, 1),
            "train_seconds": metrics["train_seconds"],
            "budget": "tuned recipe" if budget is None else (
                f"{budget['kept_images']} of {budget['pool_images']} images, "
                f"{budget['epochs']} epochs"),
            "test_images": f"{metrics['test_images']} of {metrics['test_pool_images']}",
            **demo_ordering(metrics)}


def demo_ordering(metrics: dict[str, Any]) -> dict[str, Any]:
    """The ordering cells of a demo's ``metrics.json`` (mAP) and its two checks: bct/old above
    old/old, and independent/old far below old/old — less than half of old/old's margin over
    chance (a random ranking), which with 10 classes is 0.10, not 0."""
    cell = {(r["query_model"], r["gallery_model"]): r["map"] for r in metrics["matrix"]}
    old_old, bct_old, ind_old = (cell[("old", "old")], cell[("bct", "old")],
                                 cell[("independent", "old")])
    chance = metrics["chance_map"]
    return {"old_old": old_old, "bct_old": bct_old, "independent_old": ind_old,
            "chance": chance, "bct_above_old": bct_old > old_old,
            "independent_far_below": ind_old - chance < 0.5 * (old_old - chance)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", default="synthetic,omniglot,cifar10,idx")
    parser.add_argument("--omniglot-root", default="../shared/data/omniglot")
    parser.add_argument("--cifar10-root", default="../shared/data/cifar10")
    parser.add_argument("--idx-root", default=None, help="real MNIST / Fashion-MNIST IDX files")
    parser.add_argument("--idx-name", default="mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--idx-from-cifar10", action="store_true",
                        help="write CIFAR-10 as grayscale IDX files and demo them as mnist")
    args = parser.parse_args()
    roots = {"synthetic": None, "omniglot": args.omniglot_root, "cifar10": args.cifar10_root}
    rows = []
    for name in [d for d in args.datasets.split(",") if d]:
        if name == "idx":
            if args.idx_root is None and not args.idx_from_cifar10:
                raise SystemExit("dataset idx needs --idx-root or --idx-from-cifar10")
            root = args.idx_root or str(write_idx_from_cifar10(args.cifar10_root,
                                                               args.out / "idx_from_cifar10"))
            row = run_demo(args.idx_name, root, args.out / "idx")
            row["dataset"] = f"{args.idx_name} (IDX" + (
                ", CIFAR-10 in grayscale)" if args.idx_root is None else ")")
        elif name in roots:
            row = run_demo(name, roots[name], args.out / name)
        else:
            raise SystemExit(f"unknown dataset {name!r}; expected synthetic, omniglot, cifar10 "
                             "or idx")
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_time.json").write_text(json.dumps(rows, indent=2))
    print(f"\n| dataset | wall | training data | test images | chance | old/old mAP | bct/old | "
          f"independent/old | bct/old > old/old | independent/old far below ¹ | "
          f"under {GOAL_SECONDS // 60} min |")
    print("|---|---:|---|---:|---:|---:|---:|---:|:---:|:---:|:---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['wall_seconds'] / 60:.1f} min | {r['budget']} | "
              f"{r['test_images']} | {r['chance']:.4f} | "
              f"{r['old_old']:.4f} | {r['bct_old']:.4f} | {r['independent_old']:.4f} | "
              f"{'yes' if r['bct_above_old'] else 'no'} | "
              f"{'yes' if r['independent_far_below'] else 'no'} | "
              f"{'yes' if r['wall_seconds'] < GOAL_SECONDS else 'no'} |")
    print("\n¹ independent/old − chance < ½ (old/old − chance)")


if __name__ == "__main__":
    main()
