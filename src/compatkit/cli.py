"""``compatkit <verb>``: each command parses options, calls one library function and prints.

User errors exit with status 2 and one line on stderr; ``--json`` prints one JSON object.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from compatkit.adapters.cli import adapt_app
from compatkit.errors import CompatkitError
from compatkit.index.cli import index_app
from compatkit.index.cli import serve as index_serve

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Upgrade the embedding model behind a retrieval system.")
app.add_typer(index_app, name="index")
app.add_typer(adapt_app, name="adapt")
app.command("serve")(index_serve)

SetOpt = Annotated[list[str], typer.Option("--set", help="config override key.path=value",
                                           rich_help_panel="Config")]


def _out(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=None, sort_keys=False))


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML recipe")] = None,
    out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/train"),
    method: Annotated[str | None, typer.Option(help="method name (see `compatkit methods`)",
                                               rich_help_panel="Config")] = None,
    old_model: Annotated[Path | None, typer.Option(help="old model artifact or run folder",
                                                   rich_help_panel="Config")] = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a literal default
    resume: Annotated[bool, typer.Option(help="continue from the run's last checkpoint")] = False,
    nproc: Annotated[int, typer.Option(
        help="processes (DistributedDataParallel via torchrun; gloo on CPU, NCCL on CUDA); "
             "train.batch_size is per process")] = 1,
) -> None:
    """Train one model (old, independent or compatible) from a recipe and overrides."""
    from compatkit.train.config import load_config
    from compatkit.train.loop import train as run_training

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(_relaunch_with_torchrun(nproc))

    overrides = list(set_)
    if method:
        overrides.insert(0, f"method.name={method}")
    if old_model:
        overrides.append(f"old_model={_artifact_dir(old_model)}")
    cfg = load_config(config, overrides)
    result = run_training(cfg, out, resume=resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    _out({"run_dir": str(result.run_dir), "artifact": str(result.artifact_dir),
          "model_version": result.manifest.model_version, "metrics": result.metrics})


@app.command()
def embed(
    model: Annotated[Path, typer.Option(help="model artifact or run folder")],
    out: Annotated[Path, typer.Option(
        help="file to write, by suffix: .safetensors (features file with labels and the "
             "model's manifest), .npy (vectors) or .npz (ids, vectors, labels as metadata, "
             "version)")],
    dataset: Annotated[str | None, typer.Option(help="dataset (default: the model's own)")] = None,
    root: Annotated[str | None, typer.Option(help="dataset root")] = None,
    part: Annotated[str, typer.Option(help="test | train | all")] = "test",
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Embed a dataset part with a model → features file with labels and the model's manifest."""
    from compatkit.artifacts import (
        VECTOR_FORMATS,
        read_manifest,
        save_features,
        save_vectors_file,
    )
    from compatkit.inference import embed_artifact
    from compatkit.train.config import DataConfig

    if out.suffix.lower() not in VECTOR_FORMATS:
        raise CompatkitError(f"--out {out}: the suffix must be one of {', '.join(VECTOR_FORMATS)}")
    artifact = _artifact_dir(model)
    data = None
    if dataset is not None or root is not None:
        base = dict(read_manifest(artifact).config.get("data", {}))
        if dataset is not None:
            base.update(name=dataset, options={})
        if root is not None:
            base["root"] = root
        data = DataConfig.model_validate(base)
    fs = embed_artifact(artifact, data=data, part=part, device=device)
    if out.suffix.lower() == ".safetensors":
        save_features(out, fs)
    else:
        save_vectors_file(out, fs.features, metadata=[{"label": int(lab)} for lab in fs.labels],
                          version=fs.manifest.model_version)
    _out({"features": str(out), "count": int(fs.features.shape[0]),
          "dim": int(fs.features.shape[1]), "model_version": fs.manifest.model_version})


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="model artifact or run folder")],
    format: Annotated[str, typer.Option("--format", help="onnx | torchscript")],
    out: Annotated[Path, typer.Option(help="file to write (.onnx, .pt)")],
) -> None:
    """Export a model as one self-contained ONNX or TorchScript file carrying its input spec."""
    from compatkit.artifacts import file_sha256, read_manifest
    from compatkit.export import EXPORT_FORMATS, export_model

    if format not in EXPORT_FORMATS:
        raise CompatkitError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got "
                             f"{format!r}")
    artifact = _artifact_dir(run)
    export_model(artifact, out, format=format)  # type: ignore[arg-type]
    manifest = read_manifest(artifact)
    _out({"out": str(out), "format": format, "model_version": manifest.model_version,
          "dim": manifest.embed_dim, "sha256": file_sha256(out)})


@app.command("eval")
def eval_(
    query_features: Annotated[Path, typer.Option(help=".npy (nq, d) or a features file")],
    gallery_features: Annotated[Path, typer.Option(help=".npy (ng, d) or a features file")],
    query_labels: Annotated[Path | None, typer.Option(help=".npy (nq,)")] = None,
    gallery_labels: Annotated[Path | None, typer.Option(help=".npy (ng,)")] = None,
    metrics: Annotated[str, typer.Option(help="comma-separated: map,cmc@1,map@r,map@100,...")] = (
        "map,cmc@1,cmc@5"),
    distance: Annotated[str, typer.Option(help="cosine | l2")] = "cosine",
    exclude_self: Annotated[bool, typer.Option(
        help="query i and gallery i are the same item (leave-one-out)")] = False,
    chunk_size: Annotated[int, typer.Option(help="gallery rows scored at once")] = 4096,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Retrieval metrics of query features against gallery features (features made anywhere)."""
    from compatkit.eval.metrics import retrieval_metrics

    q, ql = _load_side(query_features, query_labels, "query")
    g, gl = _load_side(gallery_features, gallery_labels, "gallery")
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    result = retrieval_metrics(q, ql, g, gl, metrics=names, distance=distance,
                               exclude_self=exclude_self, chunk_size=chunk_size)
    if as_json:
        _out(result)
    else:
        for name, value in result.items():
            typer.echo(f"{name}\t{value:.6f}")


@app.command()
def curve(
    query_features: Annotated[Path, typer.Option(help=".npy (nq, d) new-model queries")],
    old_gallery_features: Annotated[Path, typer.Option(help=".npy (ng, d) stored old features")],
    new_gallery_features: Annotated[Path, typer.Option(help=".npy (ng, d) new features")],
    query_labels: Annotated[Path, typer.Option(help=".npy (nq,)")],
    gallery_labels: Annotated[Path, typer.Option(help=".npy (ng,)")],
    order: Annotated[str, typer.Option(
        help="random | uncertainty | sigma | oracle | given")] = "random",
    old_classifier: Annotated[Path | None, typer.Option(
        help=".npy (C, d) old classifier rows (uncertainty order)")] = None,
    uncertainty: Annotated[str, typer.Option(
        help="entropy | least_confidence | margin")] = "entropy",
    temperature: Annotated[float, typer.Option(help="softmax temperature (uncertainty)")] = 1.0,
    sigma: Annotated[Path | None, typer.Option(help=".npy (ng,) FastFill σ (sigma order)")] = None,
    order_file: Annotated[Path | None, typer.Option(help="permutation file (given order)")] = None,
    old_query_features: Annotated[Path | None, typer.Option(
        help=".npy (nq, d_old) old-model queries for flips against old/old (default: the old "
             "gallery with --exclude-self, else flips against the previous step)")] = None,
    exclude_self: Annotated[bool, typer.Option(help="leave-one-out: query i is item i")] = False,
    steps: Annotated[int, typer.Option(help="equally spaced fractions from 0 to 1")] = 21,
    seed: Annotated[int, typer.Option(help="seed of the random order")] = 0,
    metrics: Annotated[str, typer.Option(help="comma-separated metric names")] = "map,cmc@1",
    distance: Annotated[str, typer.Option(help="cosine | l2")] = "cosine",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    plot: Annotated[Path | None, typer.Option(help="write the curve as a PNG")] = None,
) -> None:
    """Simulated hot-refresh backfill curve: metrics and flips on the mixed gallery at each
    fraction (features in, no index)."""
    from compatkit.eval import backfill_curve
    from compatkit.ordering import backfill_order, load_order

    q = _load_npy(query_features, "query features")
    go = _load_npy(old_gallery_features, "old gallery features")
    gn = _load_npy(new_gallery_features, "new gallery features")
    inputs: dict[str, Any] = {
        "random": lambda: {"seed": seed},
        "uncertainty": lambda: {"old_features": go, "temperature": temperature,
                                "kind": uncertainty,
                                "classifier": _load_npy(_required(old_classifier,
                                                                  "--old-classifier"),
                                                        "old classifier")},
        "sigma": lambda: {"sigma": _load_npy(_required(sigma, "--sigma"), "sigma")},
        "oracle": lambda: {"new_features": gn, "old_features": go},
        "given": lambda: {"order": load_order(_required(order_file, "--order-file"))},
    }.get(order, dict)()
    perm = backfill_order(order, len(go), **inputs)
    old_query = (_load_npy(old_query_features, "old query features")
                 if old_query_features is not None else go if exclude_self else None)
    simulated = backfill_curve(
        q, _load_npy(query_labels, "query labels"), go, gn,
        _load_npy(gallery_labels, "gallery labels"), perm, steps=steps,
        metrics=[m.strip() for m in metrics.split(",") if m.strip()], distance=distance,
        exclude_self=exclude_self, old_query=old_query,
        reference="old_old" if old_query is not None else "previous_step", ordering=order,
    )
    result = simulated.to_json()
    flat = {"fractions": result["fractions"], **result.pop("metrics"), **{
        k: v for k, v in result.items() if k != "fractions"}}
    if plot is not None:
        from compatkit.eval import retrieval_metrics
        from compatkit.eval.plots import plot_backfill_curves

        first = next(iter(simulated.metrics))
        old_old = (retrieval_metrics(old_query, _load_npy(query_labels, "query labels"), go,
                                     _load_npy(gallery_labels, "gallery labels"),
                                     metrics=[first], distance=distance,
                                     exclude_self=exclude_self)[first]
                   if old_query is not None else None)
        plot_backfill_curves({order: simulated}, plot, metric=first, old_old=old_old,
                             new_new=simulated.metrics[first][-1])
    if as_json:
        _out(flat)
    else:
        for i, frac in enumerate(simulated.fractions):
            values = "  ".join(f"{m}={v[i]:.4f}" for m, v in simulated.metrics.items())
            typer.echo(f"{frac:.3f}  {values}  nfr={simulated.nfr[i]:.4f}")
        for m, auc in simulated.auc.items():
            typer.echo(f"auc {m}: trapezoid={auc['trapezoid']:.4f} mean={auc['mean']:.4f}")


@app.command("backfill", hidden=True)
@functools.wraps(curve)
def backfill_deprecated(*args: Any, **kwargs: Any) -> None:
    """Deprecated name of ``compatkit curve``."""
    typer.echo("warning: `compatkit backfill` is deprecated; use `compatkit curve`", err=True)
    curve(*args, **kwargs)


@app.command("upgrade-embeddings")
def upgrade_embeddings(
    features: Annotated[Path, typer.Option(help="stored gallery features file (.safetensors)")],
    transformation: Annotated[list[Path], typer.Option(
        help="transformation artifact or run folder; repeat to chain v1 → v2 → v3")],
    out: Annotated[Path, typer.Option(help="upgraded features file to write")],
    side_info: Annotated[Path | None, typer.Option(
        help="side-information features of the same items (FCT)")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Upgrade stored embeddings with learned transformations, without images."""
    from compatkit.artifacts import load_features, save_features
    from compatkit.feature_upgrade import upgrade_features

    side = load_features(side_info) if side_info else None
    fs = upgrade_features(load_features(features), [_artifact_dir(t) for t in transformation],
                          side=side, device=device)
    save_features(out, fs)
    _out({"out": str(out), "model_version": fs.manifest.model_version,
          "lineage": list(fs.manifest.lineage)})


@app.command("bict-sweep")
def bict_sweep(
    bct_config: Annotated[Path, typer.Argument(help="YAML recipe of stage one (bct)")],
    bict_config: Annotated[Path, typer.Argument(help="YAML recipe of stage two (bict)")],
    old_model: Annotated[Path, typer.Option(help="old model artifact or run folder")],
    lambdas: Annotated[list[float], typer.Option("--lambda", help="λ_b values; repeat")],
    out: Annotated[Path, typer.Option(help="sweep folder")] = Path("runs/bict_sweep"),
    set_: SetOpt = [],  # noqa: B006
    bict_set: Annotated[list[str], typer.Option(
        "--bict-set", help="override for stage two only")] = [],  # noqa: B006
    metric: Annotated[str, typer.Option(help="metric of the printed table")] = "map",
) -> None:
    """BiCT λ_b sweep: BCT(λ_b) then the forward transformation; self, backward and forward
    retrieval per λ_b (JSON on stdout, a markdown table on stderr)."""
    from compatkit.experiments import bict_sweep as run_sweep
    from compatkit.experiments import format_sweep

    rows = run_sweep(set_, lambdas, out, old_model=_artifact_dir(old_model),
                     bct_config=bct_config, bict_config=bict_config, bict_overrides=bict_set)
    typer.echo(format_sweep(rows, metric), err=True)
    _out({"rows": [dataclasses.asdict(row) for row in rows]})


@app.command()
def demo(
    dataset: Annotated[str, typer.Option(help="any dataset the loaders know")] = "synthetic",
    root: Annotated[str | None, typer.Option(help="dataset root (real datasets)")] = None,
    out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/demo"),
    set_: SetOpt = [],  # noqa: B006
    progress: Annotated[bool, typer.Option(help="show training progress bars")] = True,
    full: Annotated[bool, typer.Option(
        "--full", help="train on every image, or the tuned recipe as it is, and evaluate "
                       "on the whole test set (the demo otherwise sizes both to finish "
                       "within about 10 minutes on 2 cores)")] = False,
) -> None:
    """Lab demo: train an old model and new models (independent, l2, bct) and print the
    compatibility matrix; writes report.md, metrics.json and plots into the run folder."""
    from compatkit.lab_demo import run_lab_demo

    result = run_lab_demo(dataset, root, out, overrides=set_, progress=progress, full=full)
    typer.echo(result.report.read_text())
    typer.echo(f"report: {result.report}")


@app.command()
def methods() -> None:
    """List the registered methods, one per line, name first."""
    from compatkit.methods import METHODS

    for name, summary in METHODS.describe():
        typer.echo(f"{name}\t{summary}")


@app.command()
def datasets() -> None:
    """List the registered datasets, one per line, name first."""
    from compatkit.data import list_datasets

    for name, summary in list_datasets():
        typer.echo(f"{name}\t{summary}")


def _relaunch_with_torchrun(nproc: int) -> int:
    """Run this same ``compatkit train`` command in ``nproc`` processes under torchrun."""
    import subprocess

    args, skip = [], False
    for arg in sys.argv[2:]:  # drop the program name, the verb and --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "compatkit", "train", *args]
    return subprocess.run(cmd, check=False).returncode


def _required(value: Path | None, flag: str) -> Path:
    if value is None:
        raise CompatkitError(f"{flag} is required for this order")
    return value


def _artifact_dir(path: Path) -> Path:
    """Accept a run folder (holding ``model/``) or the artifact folder itself."""
    if (path / "model" / "manifest.json").is_file():
        return path / "model"
    if (path / "manifest.json").is_file():
        return path
    raise CompatkitError(f"{path} is neither a model artifact nor a run folder with model/")


def _load_side(features: Path, labels: Path | None, side: str) -> tuple[np.ndarray, np.ndarray]:
    if features.suffix == ".safetensors":
        from compatkit.artifacts import load_features

        fs = load_features(features)
        lab = fs.labels if labels is None else _load_npy(labels, f"{side} labels")
        return fs.features, lab
    if labels is None:
        raise CompatkitError(f"--{side}-labels is required with a .npy {side} features file")
    return _load_npy(features, f"{side} features"), _load_npy(labels, f"{side} labels")


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise CompatkitError(f"{what} file {path} does not exist")
    with path.open("rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise CompatkitError(f"{what} file {path} is not a numpy file (.npy written by "
                                 "numpy.save); for a features file use .safetensors")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise CompatkitError(f"cannot read {what} from {path}: {err}") from None


def _one_line(exc: BaseException) -> str:
    """The message of a user error on one line; a pydantic error without the rejected input
    (which may be a secret)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        text = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" if e["loc"]
                         else e["msg"] for e in exc.errors(include_url=False, include_input=False))
    elif isinstance(exc, typer.TyperException):
        text = exc.format_message()
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            text += f" (see `{ctx.command_path} --help`)"
    else:
        text = str(exc)
    return " ".join(text.split())


def main() -> None:
    """Console entry point: user errors (bad input, and usage errors such as an unknown command,
    option or a bad option value) become one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        code = app(standalone_mode=False)  # --help returns 0 here
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except typer.TyperException as exc:  # typer's own click: usage errors, unreadable files
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, and success
            typer.echo(exc.format_message())
            sys.exit(0)
        typer.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(2)
    except (CompatkitError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
