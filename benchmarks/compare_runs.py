"""The methods table for new models trained outside ``benchmarks/methods.py`` (a sweep).

Every ``--new NAME=RUN`` is evaluated against the old model ``--old RUN`` on the old model's
held-out test set exactly as in ``methods.py``: self/cross mAP and CMC@1, negative flips
against old/old, and the random-order hot-refresh curve (AUC, max NFR and its dip: the lowest
mAP along the curve minus its start, negative when backfilling first makes things worse).

    python benchmarks/compare_runs.py --old runs/abl/bn_old \\
        --new contra=runs/abl/contra --new ract=runs/abl/ract_t05_w1
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import torch

from compatkit.inference import embed_images
from compatkit.train.config import RunConfig
from compatkit.train.loop import load_frozen
from compatkit.train.prepare import evaluation_images
from methods import evaluate_seed, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="old model's run folder")
    parser.add_argument("--new", action="append", required=True, help="NAME=RUN folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {}
    for item in args.new:
        name, sep, path = item.partition("=")
        if not sep or not name:
            parser.error(f"--new must look like NAME=RUN, got {item!r}")
        runs[name] = SimpleNamespace(artifact_dir=Path(path) / "model")
    old_model, old_manifest = load_frozen(args.old / "model", "cpu")
    cfg = RunConfig.model_validate(old_manifest.config)
    test = evaluation_images(cfg.data, "test")
    old_feats = embed_images(old_model, test.images, old_manifest.input)
    result = evaluate_seed(runs, {}, test.images, test.labels, old_feats, None)
    result.update({"dataset": cfg.data.name, "scenario": cfg.data.scenario})
    print(format_table(result))
    print("\n| model | hot-refresh dip (min mAP − start) |\n|---|---:|")
    for row in result["rows"]:
        print(f"| {row['method']} | {row['backfill_dip_map']:.4f} |")


if __name__ == "__main__":
    main()
