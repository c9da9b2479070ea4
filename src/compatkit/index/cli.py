"""``compatkit index ...`` and ``compatkit serve``: the index from the command line.

Each command opens the store (``--store``, default ``$COMPATKIT_INDEX_STORE`` or
``./index-store``), calls one ``compatkit.index`` function and prints; ``--json`` prints one JSON
object. Mounted by ``compatkit.cli`` as ``app.add_typer(index_app, name="index")`` and
``app.command("serve")(serve)``.
"""

from __future__ import annotations

import datetime
import json
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from compatkit.errors import CompatkitError, UnknownNameError

index_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="A versioned embedding index that serves while it is upgraded.")

StoreOpt = Annotated[Path, typer.Option("--store", envvar="COMPATKIT_INDEX_STORE",
                                        help="store folder", rich_help_panel="Store")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]
JobOpt = Annotated[int | None, typer.Option("--job", help="job id (default: the latest)")]
DEFAULT_STORE = Path("index-store")
#: Fields of a job status printed as ISO-8601 UTC times (epoch seconds in --json).
TIME_FIELDS = ("created", "updated", "finished")
CalibrateOpt = Annotated[bool | None, typer.Option(
    "--calibrate/--no-calibrate",
    help="a query adapter: fit its score calibration on --from-vectors/--to-vectors "
         "(--no-calibrate removes a stored one; default: keep it)")]
FromVectorsOpt = Annotated[Path | None, typer.Option(
    help="paired sample, the transformation's source version (.npy/.npz/.safetensors)")]
ToVectorsOpt = Annotated[Path | None, typer.Option(
    help="the same items in its target version, row for row")]


def _open(store: Path, *, create: bool = False) -> Any:
    from compatkit.index.store import DB_NAME, IndexStore

    if not create and not (store / DB_NAME).is_file():
        raise CompatkitError(f"{store} holds no index store; create one with "
                             "`compatkit index create`")
    return IndexStore(store)


def _echo(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(obj, default=str))
    else:
        for key, value in obj.items():
            if key.rsplit(".", 1)[-1] in TIME_FIELDS and isinstance(value, float):
                value = datetime.datetime.fromtimestamp(value, datetime.timezone.utc).isoformat(
                    timespec="seconds")
            typer.echo(f"{key}\t{value}")


@index_app.command("register")
def register(
    artifact: Annotated[Path, typer.Argument(
        help="model, side-info or transformation folder (or a run folder with model/)")],
    store: StoreOpt = DEFAULT_STORE,
    new: Annotated[str | None, typer.Option(help="transformation target version")] = None,
    side_version: Annotated[str | None, typer.Option(help="side-info version it needs")] = None,
    calibrate: CalibrateOpt = None,
    from_vectors: FromVectorsOpt = None,
    to_vectors: ToVectorsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register an artifact: a model version (with its compatibility relations) or a
    transformation (a query adapter NEW -> OLD with --calibrate)."""
    out = _open(store, create=True).register_artifact(
        _artifact(artifact), new=new, side_version=side_version, calibrate=calibrate,
        **_pair_vectors(from_vectors, to_vectors))
    _echo(asdict(out), as_json)


@index_app.command("version")
def version(
    name: Annotated[str, typer.Argument(help="version name")],
    dim: Annotated[int, typer.Option(help="vector dimension")],
    store: StoreOpt = DEFAULT_STORE,
    normalized: Annotated[bool, typer.Option(help="its model L2-normalises")] = True,
    hash_seed: Annotated[int | None, typer.Option(
        help="embed sources with a deterministic hash embedder (tests, load benchmarks)")
    ] = None,
    anchor_seed: Annotated[int | None, typer.Option(
        help="hash embedder: mix in the direction of this seed (a compatible-looking version)")
    ] = None,
    anchor_weight: Annotated[float, typer.Option(
        help="hash embedder: weight of the anchor direction, in [0, 1]")] = 0.0,
    onnx: Annotated[Path | None, typer.Option(
        help="embed sources with this ONNX model (onnxruntime)", rich_help_panel="Model")
    ] = None,
    torchscript: Annotated[Path | None, typer.Option(
        help="embed sources with this TorchScript model", rich_help_panel="Model")] = None,
    python: Annotated[str | None, typer.Option(
        help="package.module:factory returning an object with embed_sources(sources)",
        rich_help_panel="Model")] = None,
    kwargs: Annotated[str | None, typer.Option(
        help="JSON object of keyword arguments for the --python factory",
        rich_help_panel="Model")] = None,
    image_size: Annotated[int | None, typer.Option(
        help="input spec: images resized to this square size", rich_help_panel="Input")
    ] = None,
    channels: Annotated[int | None, typer.Option(
        help="input spec: 1 (grey) or 3 (RGB)", rich_help_panel="Input")] = None,
    mean: Annotated[str | None, typer.Option(
        help="input spec: per-channel mean in [0, 1], comma-separated", rich_help_panel="Input")
    ] = None,
    std: Annotated[str | None, typer.Option(
        help="input spec: per-channel std in [0, 1], comma-separated", rich_help_panel="Input")
    ] = None,
    raw_arrays: Annotated[bool, typer.Option(
        help="input spec: each source is a .npy array fed as it is", rich_help_panel="Input")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Register a version by hand: vectors only, or with a hash, ONNX, TorchScript or Python
    embedder (--onnx/--torchscript files carry their input spec when `compatkit export`
    wrote them; else give --channels, --image-size, --mean, --std or --raw-arrays)."""
    from compatkit.index.external_embedders import spec_from_options

    if hash_seed is None and (anchor_seed is not None or anchor_weight):
        raise CompatkitError("--anchor-seed and --anchor-weight need --hash-seed")
    if not 0.0 <= anchor_weight <= 1.0:
        raise CompatkitError(f"--anchor-weight must be in [0, 1], got {anchor_weight}")

    embedder = spec_from_options(onnx=onnx, torchscript=torchscript, python=python,
                                 kwargs=kwargs, image_size=image_size, channels=channels,
                                 mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                                 raw_arrays=raw_arrays)
    if hash_seed is not None:
        if embedder is not None:
            raise CompatkitError("give --hash-seed or a model (--onnx, --torchscript, "
                                 "--python), not both")
        embedder = {"kind": "hash", "seed": hash_seed, "anchor_seed": anchor_seed,
                    "anchor_weight": anchor_weight}
    info = _open(store, create=True).register_version(name, dim=dim, normalized=normalized,
                                                      embedder=embedder)
    _echo(asdict(info), as_json)


def _floats(text: str | None, flag: str) -> list[float] | None:
    """Comma-separated floats, e.g. ``0.5,0.5,0.5``."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise CompatkitError(f"{flag} must be comma-separated numbers, got {text!r}") from None


@index_app.command("relate")
def relate(
    kind: Annotated[str, typer.Argument(help="compatible | transform")],
    old: Annotated[str, typer.Argument(help="old version")],
    new: Annotated[str, typer.Argument(help="new version")],
    store: StoreOpt = DEFAULT_STORE,
    artifact: Annotated[Path | None, typer.Option(help="transformation folder")] = None,
    side_version: Annotated[str | None, typer.Option(help="side-info version")] = None,
    calibrate: CalibrateOpt = None,
    from_vectors: FromVectorsOpt = None,
    to_vectors: ToVectorsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Declare NEW compatible with OLD, or a transformation OLD -> NEW (--artifact; a query
    adapter when OLD is the newer model, calibrated with --calibrate)."""
    st = _open(store)
    if kind == "compatible":
        if calibrate is not None or from_vectors is not None or to_vectors is not None:
            raise CompatkitError("--calibrate, --from-vectors and --to-vectors apply to a "
                                 "transform relation")
        rel = st.declare_compatible(new, old)
    elif kind == "transform":
        if artifact is None:
            raise CompatkitError("a transform relation needs --artifact")
        rel = st.declare_transform(old, new, artifact, side_version=side_version,
                                   calibrate=calibrate, **_pair_vectors(from_vectors, to_vectors))
    else:
        raise CompatkitError(f"relation kind must be 'compatible' or 'transform', got {kind!r}")
    _echo(asdict(rel), as_json)


@index_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="collection name")],
    store: StoreOpt = DEFAULT_STORE,
    version: Annotated[str | None, typer.Option(help="serving version (registered)")] = None,
    artifact: Annotated[Path | None, typer.Option(help="register this model and serve it")] = None,
    index: Annotated[str, typer.Option(help="flat | ivf | hnsw")] = "flat",
    engine: Annotated[str, typer.Option(help="faiss (in-process) | qdrant")] = "faiss",
    qdrant_location: Annotated[str | None, typer.Option(
        help="qdrant: ':memory:', a local-mode folder, or an http(s):// URL")] = None,
    namespace: Annotated[str, typer.Option(help="qdrant collection name prefix")
                         ] = "compatkit",
    nlist: Annotated[int | None, typer.Option(help="IVF lists (default 4·√n)")] = None,
    nprobe: Annotated[int, typer.Option(help="IVF lists visited per query")] = 16,
    hnsw_m: Annotated[int, typer.Option(help="HNSW graph degree")] = 32,
    ef_search: Annotated[int, typer.Option(help="HNSW search beam")] = 256,
    ef_construction: Annotated[int, typer.Option(help="HNSW build beam")
                               ] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Create an empty collection served by --version (or by the model --artifact)."""
    from compatkit.index.options import BackendOptions  # faiss: not at CLI start-up

    options = BackendOptions(kind=index, engine=engine, location=qdrant_location,
                             namespace=namespace, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m,
                             ef_search=ef_search, ef_construction=ef_construction)
    st = _open(store, create=True)
    if artifact is not None:
        version = st.register_artifact(_artifact(artifact)).name
    if version is None:
        raise CompatkitError("give --version or --artifact")
    _echo(asdict(st.create_collection(name, version, index=options).stats()), as_json)


@index_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="collection name")],
    store: StoreOpt = DEFAULT_STORE,
    images: Annotated[Path | None, typer.Option(
        help="folder of images: id = relative path, source = the file, label = its folder")
    ] = None,
    features: Annotated[Path | None, typer.Option(
        help="vectors: a features file (.safetensors, with its version), a .npy (N, D) array "
             "(with --ids) or a .npz (ids, vectors, optional metadata and version)")] = None,
    ids: Annotated[Path | None, typer.Option(
        help="one item id per line, one per row of --features (needed by a .npy)")] = None,
    version: Annotated[str | None, typer.Option(
        help="version of .npy/.npz vectors (default: the file's, else the serving version)")
    ] = None,
    jsonl: Annotated[Path | None, typer.Option(
        help="one item per line: {id, source?, metadata?, vector?, version?}")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add items from an image folder, a vectors file or a JSON-lines file: all or none (a
    bad item leaves the collection as it was)."""
    from compatkit.index.collection import ItemInput

    if sum(x is not None for x in (images, features, jsonl)) != 1:
        raise CompatkitError("give exactly one of --images, --features, --jsonl")
    if features is None and (ids is not None or version is not None):
        raise CompatkitError("--ids and --version go with --features")
    st = _open(store)
    coll = st.collection(name)
    items: list[ItemInput]
    if images is not None:
        items = _image_items(images)
    elif features is not None:
        items = _feature_items(st, features, ids=ids, version=version)
    else:
        items = _jsonl_items(jsonl)  # type: ignore[arg-type]
    try:
        res = coll.add(items)  # embeds in chunks, writes in one transaction
    except ValueError as err:  # CompatkitError included
        raise CompatkitError(f"{err}; nothing was added") from None
    _echo({"collection": name, "added": res.added, "replaced": res.replaced,
           "items": coll.count()}, as_json)


@index_app.command("search")
def search(
    name: Annotated[str, typer.Argument(help="collection name")],
    store: StoreOpt = DEFAULT_STORE,
    vector: Annotated[str | None, typer.Option(help="JSON list of floats")] = None,
    version: Annotated[str | None, typer.Option(help="the vector's version")] = None,
    image: Annotated[Path | None, typer.Option(help="raw image, embedded by the serving model")
                     ] = None,
    k: Annotated[int, typer.Option("-k", help="results")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Top-k over the whole collection for a vector or an image."""
    coll = _open(store).collection(name)
    if (vector is None) == (image is None):
        raise CompatkitError("give exactly one of --vector and --image")
    if image is not None:
        result = coll.search(source=str(image.resolve()), k=k)
    else:
        try:
            values = json.loads(vector or "")
        except json.JSONDecodeError as err:
            raise CompatkitError(f"--vector is not a JSON list: {err}") from None
        result = coll.search(values, version=version, k=k)
    if as_json:
        typer.echo(json.dumps({"query_version": result.query_version,
                               "hits": [asdict(h) for h in result.hits]}))
        return
    for rank, hit in enumerate(result.hits, 1):
        origin = f" (from {hit.transformed_from})" if hit.transformed_from else ""
        typer.echo(f"{rank}\t{hit.id}\t{hit.score:.6f}\t{hit.version}{origin}")


@index_app.command("upgrade")
def upgrade(
    name: Annotated[str, typer.Argument(help="collection name")],
    to: Annotated[str, typer.Option("--to", help="new version")],
    store: StoreOpt = DEFAULT_STORE,
    strategy: Annotated[str, typer.Option(help="hot-refresh | transform | cold")] = "hot-refresh",
    order: Annotated[str, typer.Option(help="random | uncertainty | sigma | given")] = "random",
    given: Annotated[Path | None, typer.Option(help="item ids, one per line (order given)")
                     ] = None,
    batch_size: Annotated[int, typer.Option(help="items per batch")] = 256,
    seed: Annotated[int, typer.Option(help="seed of the random order")] = 0,
    then_refresh: Annotated[bool, typer.Option(help="transform, then re-embed sources")] = False,
    run: Annotated[bool, typer.Option(help="run the batches here until done")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Start an upgrade (and, with --run, process it here; Ctrl-C leaves it resumable)."""
    st = _open(store)
    given_ids = None
    if given is not None:
        given_ids = [ln.strip() for ln in given.read_text().splitlines() if ln.strip()]
    status = st.collection(name).start_upgrade(
        to, strategy=strategy, ordering=order, seed=seed, batch_size=batch_size,
        given_order=given_ids, then_refresh=then_refresh)
    if run:
        status = _run_worker(st, status.job, "local")
    _echo(status.as_dict(), as_json)


@index_app.command("work")
def work(
    name: Annotated[str, typer.Argument(help="collection name")],
    store: StoreOpt = DEFAULT_STORE,
    job: JobOpt = None,
    engine: Annotated[str, typer.Option(help="local (this process) | torchrun | ray")] = "local",
    workers: Annotated[int, typer.Option(help="worker processes (torchrun, ray)")] = 1,
    worker: Annotated[str, typer.Option(help="local claim name (a restart resumes its batch)")
                      ] = "local",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (torchrun, ray)")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Process a running upgrade's batches until it completes or pauses."""
    from compatkit.index.distributed import backfill
    from compatkit.index.upgrade import latest_job

    st = _open(store)
    job_id = job or latest_job(st, name)
    if engine == "local" and workers == 1:  # in this process, stoppable by SIGINT/SIGTERM
        _echo(_run_worker(st, job_id, worker).as_dict(), as_json)
        return
    _echo(backfill(st, job_id, engine=engine, workers=workers, device=device).as_dict(),
          as_json)


@index_app.command("status")
def status(
    name: Annotated[str, typer.Argument(help="collection name")],
    store: StoreOpt = DEFAULT_STORE,
    job: JobOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The collection's counts and its latest upgrade's progress (fraction, rate, ETA)."""
    from compatkit.index.upgrade import job_status, latest_job

    st = _open(store)
    out: dict[str, Any] = {"collection": asdict(st.collection(name).stats())}
    if job is not None:
        out["upgrade"] = job_status(st, job).as_dict()  # an unknown job is an error
    else:
        try:
            out["upgrade"] = job_status(st, latest_job(st, name)).as_dict()
        except UnknownNameError:  # never upgraded
            out["upgrade"] = None
    if as_json:
        typer.echo(json.dumps(out, default=str))
        return
    _echo(out["collection"], False)
    if out["upgrade"] is not None:
        _echo({f"upgrade.{k}": v for k, v in out["upgrade"].items()}, False)


def _job_command(action: str) -> Callable[..., None]:
    def command(
        name: Annotated[str, typer.Argument(help="collection name")],
        store: StoreOpt = DEFAULT_STORE,
        job: JobOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        from compatkit.index import upgrade as up

        st = _open(store)
        _echo(getattr(up, action)(st, job or up.latest_job(st, name)).as_dict(), as_json)

    command.__doc__ = {
        "pause": "Pause the latest (or --job) upgrade.",
        "resume": "Resume a paused upgrade.",
        "rollback": "Return the collection to the old version with the vectors it had.",
        "finalize": "Drop the kept old vectors; the upgrade can no longer be rolled back.",
    }[action]
    return command


for _action in ("pause", "resume", "rollback", "finalize"):
    index_app.command(_action)(_job_command(_action))


@index_app.command("list")
def list_collections(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Collections and versions of the store."""
    st = _open(store)
    out = {"collections": st.collection_names(), "versions": [v.name for v in st.versions()],
           "relations": [r.describe() for r in st.relations()]}
    if as_json:
        typer.echo(json.dumps(out))
        return
    for key, values in out.items():
        for value in values:
            typer.echo(f"{key[:-1]}\t{value}")


@index_app.command("demo")
def demo(
    old: Annotated[Path, typer.Option(help="old model artifact")],
    new: Annotated[Path, typer.Option(help="new, compatible model artifact (e.g. BCT)")],
    out: Annotated[Path, typer.Option(help="a new folder for sources and store")],
    dataset: Annotated[str, typer.Option(help="dataset name")] = "synthetic",
    root: Annotated[str | None, typer.Option(help="dataset root")] = None,
    limit: Annotated[int, typer.Option(help="images used (gallery + queries)")] = 2000,
    queries: Annotated[int, typer.Option(help="queries held out")] = 200,
    order: Annotated[str, typer.Option(help="backfill order")] = "random",
    batch_size: Annotated[int, typer.Option(help="items per batch")] = 64,
    batch_pause: Annotated[float, typer.Option(help="seconds to sleep after each batch")] = 0.0,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
) -> None:
    """Build a collection with OLD, upgrade it hot to NEW while querying it; print accuracy."""
    from compatkit.artifacts import read_manifest
    from compatkit.data import load_dataset
    from compatkit.index.demo import run_system_demo

    old, new = _artifact(old), _artifact(new)
    spec = read_manifest(old).input
    splits = load_dataset(dataset, root, image_size=spec.image_size if spec else 32)
    ds = splits.test if splits.test is not None else splits.train
    idx = np.random.default_rng(seed).permutation(len(ds))[:limit]
    typer.echo("backfilled\ttop-1 accuracy\tanswered by")
    shown: list[tuple[float, float]] = []

    def show(p: Any) -> None:  # one line per new (fraction, accuracy)
        if not shown or shown[-1] != (p.fraction, p.accuracy):
            shown.append((p.fraction, p.accuracy))
            typer.echo(f"{100 * p.fraction:5.1f}%\t{p.accuracy:.4f}\t{p.answered_by}")

    result = run_system_demo(
        old, new, ds.images[np.sort(idx)], ds.labels[np.sort(idx)], work_dir=out,
        n_queries=queries, ordering=order, batch_size=batch_size, seed=seed,
        batch_pause_s=batch_pause, on_point=show)
    typer.echo(f"old/old accuracy before the upgrade\t{result.old_accuracy:.4f}")
    typer.echo(f"compatkit.eval cmc@1 new/old (start)\t{result.reference_cross:.4f}")
    typer.echo(f"compatkit.eval cmc@1 new/new (end)\t{result.reference_self:.4f}")


def serve(
    store: StoreOpt = DEFAULT_STORE,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    token: Annotated[str, typer.Option(envvar="COMPATKIT_ADMIN_TOKEN",
                                       help="bearer token for writes (env COMPATKIT_ADMIN_TOKEN)")
                     ] = "",
    source_root: Annotated[Path | None, typer.Option(help="item sources must lie under it")
                           ] = None,
    worker: Annotated[bool, typer.Option(help="run upgrade batches in the server")] = True,
    max_body_mb: Annotated[float, typer.Option(help="largest request body")] = 8.0,
    workers: Annotated[int, typer.Option(
        min=1, help="server processes on the store (on 2 cores: 2)")] = 1,
) -> None:
    """Serve the index over HTTP (FastAPI + uvicorn), in one process or --workers."""
    from pydantic import ValidationError

    from compatkit.index.service import ServiceSettings
    from compatkit.index.service.launch import serve as serve_store

    try:
        settings = ServiceSettings(admin_token=token, source_root=source_root, run_worker=worker,
                                   max_body_bytes=int(max_body_mb * 1024 * 1024))
    except ValidationError as err:  # its text would echo the rejected token
        reasons = "; ".join(e["msg"] for e in err.errors(include_url=False, include_input=False))
        raise CompatkitError(f"bad service settings: {reasons}") from None
    _open(store, create=True).close()
    serve_store(store, settings, host=host, port=port, workers=workers)


def _pair_vectors(from_vectors: Path | None, to_vectors: Path | None) -> dict[str, Any]:
    """The paired sample's arrays read from their files (None where no file is given)."""
    from compatkit.artifacts import load_vectors_file

    return {name: None if path is None else load_vectors_file(path).vectors
            for name, path in (("from_vectors", from_vectors), ("to_vectors", to_vectors))}


def _artifact(path: Path) -> Path:
    """An artifact folder, or a training run folder holding one in ``model/``."""
    return path / "model" if (path / "model" / "manifest.json").is_file() else path


def _run_worker(store: Any, job: int, worker: str) -> Any:
    """Run a job's batches in this process; SIGINT/SIGTERM stop after the current batch."""
    from compatkit.index.upgrade import run_backfill

    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        return run_backfill(store, job, worker=worker, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _image_items(folder: Path) -> list:
    from compatkit.data.files import IMAGE_EXTENSIONS
    from compatkit.index.collection import ItemInput

    if not folder.is_dir():
        raise CompatkitError(f"--images {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    return [ItemInput(p.relative_to(folder).as_posix(), source=str(p.resolve()),
                      metadata={"label": p.parent.name} if p.parent != folder else {})
            for p in files]


def _feature_items(store: Any, path: Path, *, ids: Path | None, version: str | None) -> list:
    from compatkit.artifacts import load_vectors_file
    from compatkit.index.collection import ItemInput

    vf = load_vectors_file(path, ids=ids)
    if vf.ids is None:
        raise CompatkitError(f"{path} holds vectors only: give --ids FILE with one item id per "
                             "line, one per row")
    if vf.manifest is not None:
        if version is not None and version != vf.manifest.model_version:
            raise CompatkitError(f"{path} holds vectors of version "
                                 f"{vf.manifest.model_version!r}, not {version!r}")
        m = vf.manifest
        if m.model_version not in {v.name for v in store.versions()}:
            store.register_version(m.model_version, dim=m.embed_dim, normalized=m.normalized)
    version = version or vf.version
    metadata = vf.metadata or [{} for _ in vf.ids]
    return [ItemInput(i, vector=v, version=version, metadata=meta)
            for i, v, meta in zip(vf.ids, vf.vectors, metadata, strict=True)]


def _jsonl_items(path: Path) -> list:
    from compatkit.index.collection import ItemInput

    if path.is_dir():
        raise CompatkitError(f"--jsonl {path} is a directory; expected a JSON-lines file")
    if not path.is_file():
        raise CompatkitError(f"--jsonl {path} does not exist")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(ItemInput(**row))
        except (json.JSONDecodeError, TypeError) as err:
            raise CompatkitError(f"{path}:{n}: not an item object ({err})") from None
    return items

