"""``compatkit index ...`` and ``compatkit serve``: the index from the command line.

Each command opens the store (``--store``, default ``$COMPATKIT_INDEX_STORE`` or
``./index-store``), calls one ``compatkit.index`` function and prints; ``--json`` prints one JSON
object. Mounted by ``compatkit.cli`` as ``app.add_typer(index_app, name="index")`` and
``app.command("serve")(serve)``.
"""

from __future__ import annotations

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
ADD_CHUNK = 256


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
            typer.echo(f"{key}\t{value}")


@index_app.command("register")
def register(
    artifact: Annotated[Path, typer.Argument(
        help="model, side-info or transformation folder (or a run folder with model/)")],
    store: StoreOpt = DEFAULT_STORE,
    new: Annotated[str | None, typer.Option(help="transformation target version")] = None,
    side_version: Annotated[str | None, typer.Option(help="side-info version it needs")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register an artifact: a model version (with its compatibility relations) or a
    transformation."""
    out = _open(store, create=True).register_artifact(_artifact(artifact), new=new,
                                                      side_version=side_version)
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
    as_json: JsonOpt = False,
) -> None:
    """Register a version by hand: vectors only, or with a hash embedder."""
    embedder = None if hash_seed is None else {"kind": "hash", "seed": hash_seed}
    info = _open(store, create=True).register_version(name, dim=dim, normalized=normalized,
                                                      embedder=embedder)
    _echo(asdict(info), as_json)


@index_app.command("relate")
def relate(
    kind: Annotated[str, typer.Argument(help="compatible | transform")],
    old: Annotated[str, typer.Argument(help="old version")],
    new: Annotated[str, typer.Argument(help="new version")],
    store: StoreOpt = DEFAULT_STORE,
    artifact: Annotated[Path | None, typer.Option(help="transformation folder")] = None,
    side_version: Annotated[str | None, typer.Option(help="side-info version")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Declare NEW compatible with OLD, or a transformation OLD -> NEW (--artifact)."""
    st = _open(store)
    if kind == "compatible":
        rel = st.declare_compatible(new, old)
    elif kind == "transform":
        if artifact is None:
            raise CompatkitError("a transform relation needs --artifact")
        rel = st.declare_transform(old, new, artifact, side_version=side_version)
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
        help="features file (.safetensors): vectors with their version")] = None,
    jsonl: Annotated[Path | None, typer.Option(
        help="one item per line: {id, source?, metadata?, vector?, version?}")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add items from an image folder, a features file or a JSON-lines file."""
    from compatkit.index.collection import ItemInput

    if sum(x is not None for x in (images, features, jsonl)) != 1:
        raise CompatkitError("give exactly one of --images, --features, --jsonl")
    st = _open(store)
    coll = st.collection(name)
    items: list[ItemInput]
    if images is not None:
        items = _image_items(images)
    elif features is not None:
        items = _feature_items(st, features)
    else:
        items = _jsonl_items(jsonl)  # type: ignore[arg-type]
    added = replaced = 0
    for start in range(0, len(items), ADD_CHUNK):
        res = coll.add(items[start:start + ADD_CHUNK])
        added, replaced = added + res.added, replaced + res.replaced
    _echo({"collection": name, "added": added, "replaced": replaced, "items": coll.count()},
          as_json)


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
    try:
        out["upgrade"] = job_status(st, job or latest_job(st, name)).as_dict()
    except UnknownNameError:
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
    from compatkit.index.service import ServiceSettings
    from compatkit.index.service.launch import serve as serve_store

    try:
        settings = ServiceSettings(admin_token=token, source_root=source_root, run_worker=worker,
                                   max_body_bytes=int(max_body_mb * 1024 * 1024))
    except ValueError as err:
        raise CompatkitError(f"bad service settings: {err}") from None
    _open(store, create=True).close()
    serve_store(store, settings, host=host, port=port, workers=workers)


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


def _feature_items(store: Any, path: Path) -> list:
    from compatkit.artifacts import load_features
    from compatkit.index.collection import ItemInput

    fs = load_features(path)
    m = fs.manifest
    if m.model_version not in {v.name for v in store.versions()}:
        store.register_version(m.model_version, dim=m.embed_dim, normalized=m.normalized)
    ids = fs.ids if fs.ids is not None else np.arange(len(fs.features))
    return [ItemInput(str(int(i)), vector=v, version=m.model_version,
                      metadata={"label": int(lab)})
            for i, v, lab in zip(ids, fs.features, fs.labels, strict=True)]


def _jsonl_items(path: Path) -> list:
    from compatkit.index.collection import ItemInput

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

