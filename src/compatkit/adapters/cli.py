"""``compatkit adapt ...``: fit an adapter from paired vectors, evaluate it, size the pair budget.

Vector files are what ``compatkit.artifacts.load_vectors_file`` reads (``.npy``, ``.npz`` with
``vectors``, compatkit features files), row i of each file the same item; labels come from the
rows' metadata ``label`` or ``--labels``. Mounted by
``compatkit.cli`` as ``app.add_typer(adapt_app, name="adapt")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from compatkit.errors import CompatkitError

adapt_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Adapters between two embedding models, fitted from paired vectors.")

OldOpt = Annotated[Path, typer.Option("--old", help="old-model vectors (.npy, .npz, .safetensors)")]
NewOpt = Annotated[Path, typer.Option("--new", help="new-model vectors of the same items")]
SideOpt = Annotated[Path | None, typer.Option(
    "--side", help="side-information vectors of the same items (kind fct)")]
DirectionOpt = Annotated[str, typer.Option(
    "--direction", help="old-to-new (rewrite the stored gallery) | new-to-old (query adapter)")]
LabelsOpt = Annotated[Path | None, typer.Option(
    "--labels", help=".npy (n,) class ids of the held-out items (default: from the files)")]
MetricsOpt = Annotated[str, typer.Option(help="comma-separated metric names")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]
RidgeOpt = Annotated[float, typer.Option(
    help="ridge of linear/lowrank (and the mlp skip), relative to the mean variance")]
RankOpt = Annotated[int | None, typer.Option(help="lowrank rank (default: half the smaller "
                                                  "dimension)")]
InnerOpt = Annotated[int, typer.Option(help="mlp/fct: mixer width of FCT's MLP")]
EpochsOpt = Annotated[int, typer.Option(help="mlp/fct: most epochs (early stopping)")]
SeedOpt = Annotated[int, typer.Option(help="seed of the held-out split, sampling and init")]


def _options(ridge: float, rank: int | None, inner: int, epochs: int, seed: int) -> Any:
    from compatkit.adapters.kinds import FitOptions

    return FitOptions(ridge=ridge, rank=rank, inner=inner, epochs=epochs, seed=seed)


def _vectors(path: Path | None, what: str, version: str | None = None) -> Any:
    from compatkit.adapters.io import Vectors, load_vectors

    if path is None:
        return None
    v = load_vectors(path, what)
    if version is not None or v.version is None:
        return Vectors(v.features, v.labels, v.ids, version or what, v.normalized)
    return v


def _labels(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    if not path.is_file():
        raise CompatkitError(f"labels file {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise CompatkitError(f"cannot read labels from {path}: {err}") from None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@adapt_app.command("fit")
def fit(
    old: OldOpt, new: NewOpt,
    kind: Annotated[str, typer.Option(help="procrustes | linear | lowrank | mlp | fct")],
    direction: DirectionOpt,
    out: Annotated[Path, typer.Option(help="artifact folder to write")],
    side: SideOpt = None,
    old_version: Annotated[str | None, typer.Option(
        help="version name of the old vectors (default: the features file's, else 'old')")] = None,
    new_version: Annotated[str | None, typer.Option(
        help="version name of the new vectors (default: the features file's, else 'new')")] = None,
    ridge: RidgeOpt = 1e-3, rank: RankOpt = None, inner: InnerOpt = 512, epochs: EpochsOpt = 80,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Fit an adapter from paired old/new vectors and save it as a transformation artifact."""
    from compatkit.adapters.fit import fit_adapter, save_adapter

    fitted = fit_adapter(_vectors(old, "old", old_version), _vectors(new, "new", new_version),
                         kind, direction, side=_vectors(side, "side"),
                         options=_options(ridge, rank, inner, epochs, seed))
    files = {"old": str(old), "new": str(new), **({"side": str(side)} if side else {})}
    save_adapter(fitted, out, data=files)
    result = {"artifact": str(out), **fitted.summary()}
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for key, value in result.items():
            typer.echo(f"{key}\t{_fmt(value)}")


@adapt_app.command("eval")
def eval_(
    adapter: Annotated[Path, typer.Option(help="adapter (transformation) artifact folder")],
    old: OldOpt, new: NewOpt, side: SideOpt = None, labels: LabelsOpt = None,
    metrics: MetricsOpt = "map,cmc@1", as_json: JsonOpt = False,
) -> None:
    """On held-out items: adapted test, old/old, new/new, retained fraction, NFR, top-10
    overlap with new/new (leave-one-out)."""
    from compatkit.adapters.evaluate import evaluate_adapter
    from compatkit.artifacts import load_module

    module, manifest = load_module(adapter)
    if manifest.kind != "transformation":
        raise CompatkitError(f"{adapter} holds a {manifest.kind}, not an adapter "
                             "(transformation)")
    direction = manifest.config.get("direction", "old-to-new")
    report = evaluate_adapter(module, _vectors(old, "old"), _vectors(new, "new"), direction,
                              labels=_labels(labels), side=_vectors(side, "side"),
                              metrics=[m.strip() for m in metrics.split(",") if m.strip()])
    result = {"adapter": manifest.model_version, **report.to_json()}
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{direction}: {report.items} held-out items, leave-one-out")
    typer.echo("metric\tadapted\told/old\tnew/new\tretained")
    for name, value in report.adapted.items():
        kept = report.retained[name]
        typer.echo(f"{name}\t{value:.4f}\t{report.old_old[name]:.4f}\t"
                   f"{report.new_new[name]:.4f}\t{'–' if kept is None else f'{kept:.3f}'}")
    typer.echo(f"nfr\t{report.nfr:.4f}\noverlap@{report.k}\t{report.overlap_at_k:.4f}")


@adapt_app.command("pairs")
def pairs(
    old: OldOpt, new: NewOpt, direction: DirectionOpt,
    test_old: Annotated[Path, typer.Option(help="held-out items' old vectors")],
    test_new: Annotated[Path, typer.Option(help="held-out items' new vectors")],
    kinds: Annotated[str, typer.Option(help="comma-separated kinds")] = "procrustes,linear,"
                                                                        "lowrank,mlp",
    budgets: Annotated[str, typer.Option(help="comma-separated pair counts")] = "100,1000,10000",
    side: SideOpt = None,
    test_side: Annotated[Path | None, typer.Option(help="held-out side-information")] = None,
    labels: LabelsOpt = None, metrics: MetricsOpt = "map,cmc@1",
    ridge: RidgeOpt = 1e-3, rank: RankOpt = None, inner: InnerOpt = 512, epochs: EpochsOpt = 80,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """How many pairs: the retained fraction of each kind fitted on 100, 1,000, 10,000 pairs
    (or all of them when fewer), measured on the held-out items."""
    from compatkit.adapters.evaluate import pair_budget

    try:
        counts = [int(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise CompatkitError(f"--budgets must be comma-separated integers, got "
                             f"{budgets!r}") from None
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    rows = pair_budget(_vectors(old, "old"), _vectors(new, "new"), _vectors(test_old, "old"),
                       _vectors(test_new, "new"), [k.strip() for k in kinds.split(",")
                                                   if k.strip()],
                       direction, budgets=counts, labels=_labels(labels),
                       train_side=_vectors(side, "side"), test_side=_vectors(test_side, "side"),
                       metrics=names, options=_options(ridge, rank, inner, epochs, seed))
    if as_json:
        typer.echo(json.dumps({"direction": direction, "rows": [
            {"kind": r.kind, "requested": r.requested, "pairs": r.pairs, "retained": r.retained,
             "adapted": r.adapted, "fit_seconds": r.fit_seconds, "error": r.error}
            for r in rows]}))
        return
    typer.echo("kind\tpairs\t" + "\t".join(f"retained {m}" for m in names))
    for r in rows:
        cells = ([r.error or ""] if r.error else
                 ["–" if r.retained[m] is None else f"{r.retained[m]:.3f}" for m in names])
        typer.echo(f"{r.kind}\t{r.pairs}\t" + "\t".join(cells))
