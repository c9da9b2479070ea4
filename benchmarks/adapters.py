"""Adapters fitted from paired vectors on models trained here (issue 13).

Results go to ``<out>/adapters_<pairs>.json`` and ``.md`` (one file per ``--pairs`` value, so
pairs can run separately).

Trains, with the lab's recipes (``benchmarks/methods.py``'s ``stage_config``), the old model and
three new ones: (a) ``independent``, an independently trained new model of the same architecture;
(b) ``arch``, resnet18 width 0.5 with 256-d embeddings; (c) ``bct``, the BCT model of the old one;
plus the SimCLR side-information model and the image-trained FCT transformation old → (a) with
side-information. Every model embeds the training pool (the pairs) and the held-out test set.
Per pair, kind and direction: the adapted test, old/old, new/new, the retained fraction, NFR
against old/old, the fit time and the time a query adapter adds to a 100k-item FAISS flat
search; ``--kind fct`` against the image-trained FCT; and the pair budget (100, 1,000, 10,000
pairs or all the training items when fewer).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/adapters.py --dataset omniglot \
        --root ../shared/data/omniglot --out runs/adapters/omniglot --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from common import Stopwatch
from compatkit.adapters import FitOptions, evaluate_adapter, fit_adapter, pair_budget
from compatkit.adapters.io import Vectors
from compatkit.inference import embed_images
from compatkit.lab_demo import RECIPES
from compatkit.train.loop import RunResult, load_frozen, train_or_reuse
from compatkit.train.prepare import evaluation_images
from methods import TRANSFORM, stage_config

PAIRS = {"a_independent": "independent", "b_arch": "arch", "c_bct": "bct"}
ARCH_B: dict[str, Any] = {"model": {"backbone": "resnet18_cifar", "width": 0.5, "embed_dim": 256}}
KINDS = ("procrustes", "linear", "lowrank", "mlp")
DIRECTIONS = ("old-to-new", "new-to-old")
METRICS = ["map", "cmc@1"]
BUDGETS = (100, 1_000, 10_000)
GALLERY = 100_000


def train_models(dataset: str, root: str | None, out: Path, overrides: list[str],
                 pairs: list[str]) -> dict[str, RunResult]:
    """Train (or reuse) the old model, the new model of each pair, SimCLR and the image FCT."""
    runs: dict[str, RunResult] = {}

    def stage(name: str, method: dict[str, Any], side: str = "new",
              extra: dict[str, Any] | None = None) -> RunResult:
        cfg = stage_config(dataset, root, "extended_class", name, method, side, extra, overrides)
        t0 = time.perf_counter()
        runs[name] = train_or_reuse(cfg, out / name)
        print(f"[{time.perf_counter() - t0:7.1f} s] trained {name}", flush=True)
        return runs[name]

    old = stage("old", {"name": "independent"}, "old")
    with_old = {"old_model": str(old.artifact_dir)}
    if "a_independent" in pairs:
        new = stage("independent", {"name": "independent"})
        side = stage("simclr", {"name": "simclr"}, "old")
        stage("fct_image", {"name": "fct", "inner": 512}, extra={
            **with_old, **TRANSFORM, "frozen_models": {"new": str(new.artifact_dir),
                                                       "side": str(side.artifact_dir)}})
    if "b_arch" in pairs:
        stage("arch", {"name": "independent"}, extra=ARCH_B)
    if "c_bct" in pairs:
        stage("bct", {"name": "bct"}, extra=with_old)
    return runs


def embed_all(runs: dict[str, RunResult], images: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{part: {model name: (n, d) features}} for the training pool and the test set."""
    feats: dict[str, dict[str, Any]] = {part: {} for part in images}
    for name, run in runs.items():
        if name == "fct_image":
            continue
        model, manifest = load_frozen(run.artifact_dir, "cpu")
        embed = model.module.features if manifest.kind == "side_info" else model
        for part, data in images.items():
            feats[part][name] = embed_images(embed, data.images, manifest.input)
    return feats


def query_cost(module: torch.nn.Module, d_new: int, d_old: int, *, seed: int = 0,
               singles: int = 200, batch: int = 1000) -> dict[str, float]:
    """Per-query microseconds of a 100k-item FAISS flat search over old vectors and of the
    query adapter new -> old, one query at a time and in a batch of ``batch``."""
    rng = np.random.default_rng(seed)
    gallery = rng.normal(size=(GALLERY, d_old)).astype(np.float32)
    faiss.normalize_L2(gallery)
    index = faiss.IndexFlatIP(d_old)
    index.add(gallery)
    queries = rng.normal(size=(batch, d_new)).astype(np.float32)
    module.eval()
    with torch.no_grad():
        mapped = module(torch.from_numpy(queries)).embedding.numpy()
        with Stopwatch() as adapt_one:
            for i in range(singles):
                module(torch.from_numpy(queries[i:i + 1]))
        with Stopwatch() as adapt_batch:
            module(torch.from_numpy(queries))
    with Stopwatch() as search_one:
        for i in range(singles):
            index.search(mapped[i:i + 1], 10)
    with Stopwatch() as search_batch:
        index.search(mapped, 10)
    return {"search_us": 1e6 * search_one.wall / singles,
            "adapter_us": 1e6 * adapt_one.wall / singles,
            "search_batch_us": 1e6 * search_batch.wall / batch,
            "adapter_batch_us": 1e6 * adapt_batch.wall / batch}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    pairs = [p for p in args.pairs.split(",") if p]
    unknown = sorted(set(pairs) - set(PAIRS))
    if unknown:
        raise SystemExit(f"unknown pairs {unknown}; expected a subset of {list(PAIRS)}")
    started = time.perf_counter()
    runs = train_models(args.dataset, args.root, args.out, args.overrides, pairs)
    data_cfg = stage_config(args.dataset, args.root, "extended_class", "old",
                            {"name": "independent"}, "old", None, args.overrides).data
    images = {"train": evaluation_images(data_cfg, "train"),
              "test": evaluation_images(data_cfg, "test")}
    labels = images["test"].labels
    feats = embed_all(runs, images)
    print(f"[{time.perf_counter() - started:7.1f} s] embedded {len(images['train'].labels)} "
          f"training and {len(labels)} test images", flush=True)
    options = FitOptions(epochs=args.adapter_epochs, inner=512, seed=0)

    def vec(part: str, name: str) -> Vectors:
        return Vectors(feats[part][name], version=name, normalized=True)

    result: dict[str, Any] = {"dataset": args.dataset, "train_pairs": len(images["train"].labels),
                              "test_items": len(labels), "adapter_epochs": args.adapter_epochs,
                              "rows": [], "fct": [], "budget": [], "cost": []}
    for pair in pairs:
        new = PAIRS[pair]
        for kind in KINDS:
            for direction in DIRECTIONS:
                fitted = fit_adapter(vec("train", "old"), vec("train", new), kind, direction,
                                     options=options)
                report = evaluate_adapter(fitted.module, vec("test", "old"), vec("test", new),
                                          direction, labels=labels, metrics=METRICS)
                row = {"pair": pair, "kind": kind, "direction": direction,
                       "fit_seconds": fitted.seconds, **report.to_json(),
                       "epochs_run": fitted.stats.get("epochs_run")}
                if direction == "new-to-old":
                    row["cost"] = query_cost(fitted.module, fitted.module.d_in,
                                             fitted.module.d_out)
                result["rows"].append(row)
                print(f"[{time.perf_counter() - started:7.1f} s] {pair} {kind} {direction}: "
                      f"retained mAP {report.retained['map']}", flush=True)
        if pair == "a_independent":
            result["fct"] = compare_fct(runs, feats, labels, options)
        for direction in DIRECTIONS:
            for row in pair_budget(vec("train", "old"), vec("train", new), vec("test", "old"),
                                   vec("test", new), KINDS, direction, budgets=BUDGETS,
                                   labels=labels, metrics=METRICS, options=options):
                result["budget"].append({"pair": pair, "direction": direction,
                                         **row.__dict__})
            print(f"[{time.perf_counter() - started:7.1f} s] {pair} budget {direction}",
                  flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "adapters_" + "_".join(pairs)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    table = format_tables(result)
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(table)


def compare_fct(runs: dict[str, RunResult], feats: dict[str, dict[str, Any]],
                labels: np.ndarray, options: FitOptions) -> list[dict[str, Any]]:
    """The image-trained FCT (old -> independent, SimCLR side-information) against ``adapt``'s
    fct and mlp fitted on the training pool's vectors; all on the test set, M(new, T(old))."""
    image_fct, _ = load_frozen(runs["fct_image"].artifact_dir, "cpu")
    rows = [{"adapter": "image-trained FCT (side-info)",
             **evaluate_adapter(image_fct.module, feats["test"]["old"],
                                feats["test"]["independent"], "old-to-new", labels=labels,
                                side=feats["test"]["simclr"], metrics=METRICS).to_json(),
             "fit_seconds": None}]
    for kind, side in (("fct", "simclr"), ("mlp", None)):
        fitted = fit_adapter(feats["train"]["old"], feats["train"]["independent"], kind,
                             "old-to-new", side=None if side is None else feats["train"][side],
                             options=options)
        report = evaluate_adapter(fitted.module, feats["test"]["old"],
                                  feats["test"]["independent"], "old-to-new", labels=labels,
                                  side=None if side is None else feats["test"][side],
                                  metrics=METRICS)
        rows.append({"adapter": f"adapt fit --kind {kind}", **report.to_json(),
                     "fit_seconds": fitted.seconds})
    return rows


def _f(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_tables(result: dict[str, Any]) -> str:
    """Markdown: the kinds table, the query-adapter cost, the FCT comparison, the pair budget."""
    lines = [f"**{result['dataset']}** — adapters fitted on {result['train_pairs']} training "
             f"pairs, evaluated leave-one-out on {result['test_items']} held-out test images.",
             "", "| pair | kind | direction | adapted mAP | old/old mAP | new/new mAP | "
             "retained mAP | retained CMC@1 | NFR | overlap@10 | fit s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['pair']} | {r['kind']} | {r['direction']} | "
                     f"{_f(r['adapted']['map'])} | {_f(r['old_old']['map'])} | "
                     f"{_f(r['new_new']['map'])} | {_f(r['retained']['map'], 3)} | "
                     f"{_f(r['retained']['cmc@1'], 3)} | {_f(r['nfr'])} | "
                     f"{_f(r['overlap@10'], 3)} | {_f(r['fit_seconds'], 2)} |")
    lines += ["", "Query adapter (new-to-old) cost per query against a 100k-item FAISS "
              "IndexFlatIP search (top 10) over old vectors, µs:", "",
              "| pair | kind | search, 1 query | adapter, 1 query | share | search, batch 1000 | "
              "adapter, batch 1000 | share |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "cost" in r:
            c = r["cost"]
            lines.append(f"| {r['pair']} | {r['kind']} | {c['search_us']:.0f} | "
                         f"{c['adapter_us']:.1f} | {c['adapter_us'] / c['search_us']:.1%} | "
                         f"{c['search_batch_us']:.0f} | {c['adapter_batch_us']:.2f} | "
                         f"{c['adapter_batch_us'] / c['search_batch_us']:.1%} |")
    if result["fct"]:
        lines += ["", "Vector-only fits against the image-trained FCT transformation "
                  "(old -> a_independent, gallery direction):", "",
                  "| transformation | M(new, T(old)) mAP | CMC@1 | retained mAP | NFR | fit s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in result["fct"]:
            lines.append(f"| {r['adapter']} | {_f(r['adapted']['map'])} | "
                         f"{_f(r['adapted']['cmc@1'])} | {_f(r['retained']['map'], 3)} | "
                         f"{_f(r['nfr'])} | {_f(r['fit_seconds'], 2)} |")
    lines += ["", "Pair budget: retained mAP fraction by number of pairs (all "
              f"{result['train_pairs']} training items when fewer than asked):", "",
              "| pair | direction | kind | " + " | ".join(str(b) for b in BUDGETS) + " |",
              "|---|---|---|" + "---:|" * len(BUDGETS)]
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in result["budget"]:
        cell = ("needs more" if r["error"] else _f(r["retained"]["map"], 3))
        groups.setdefault((r["pair"], r["direction"], r["kind"]), []).append(cell)
    for (pair, direction, kind), cells in groups.items():
        cells += [cells[-1]] * (len(BUDGETS) - len(cells))  # budgets past the pool repeat it
        lines.append(f"| {pair} | {direction} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="omniglot", choices=sorted(RECIPES))
    parser.add_argument("--root", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", default=",".join(PAIRS),
                        help=f"comma-separated subset of {','.join(PAIRS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="training config override for every model, key.path=value")
    parser.add_argument("--adapter-epochs", type=int, default=80,
                        help="most epochs of the mlp/fct adapters (early stopping)")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


if __name__ == "__main__":
    main()
