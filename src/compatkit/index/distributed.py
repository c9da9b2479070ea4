"""Distributed backfill: run an upgrade job's embedding work on torchrun workers or Ray Data.

Every engine runs workers behind the orchestrator's batch API: a worker claims a batch under
its name (``claim_batch``), embeds or transforms it (``compute_batch``) and commits it
(``commit_batch``: the vectors and the job's progress in one transaction, a second commit of
the same batch is a no-op). So a worker that dies loses only its batch in flight, which the
next holder of its name (a restarted rank or actor) or, after ``lease_s``, any worker takes
over; no item is written twice.

Engines (``backfill(..., engine=...)``):

- ``local`` (default): one worker in this process (``run_backfill``).
- ``torchrun``: ``workers`` processes under ``torch.distributed.run`` (``--standalone``), rank
  ``r`` claiming as ``torchrun-rank<r>`` on ``cuda:<local rank>`` when CUDA is present. A rank
  that dies makes torchrun stop the others (SIGTERM: each finishes and commits its batch) and
  restart the group, up to ``max_restarts`` times; the restarted rank resumes its own batch.
- ``ray``: Ray Data ``map_batches`` over a pool of ``workers`` model actors (one GPU each when
  the Ray cluster has GPUs). Each actor claims as ``ray-<run>-<actor id>`` (stable across an
  actor's restarts); Ray restarts a dead actor and retries its task; claims left by dead actors
  are released between rounds.

Workers open the store's SQLite database directly, so they must run on the machine that holds
the store (SQLite WAL needs a local file system). Requires the ``ray`` extra for Ray.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from compatkit.errors import CompatkitError
from compatkit.index.embedders import Embedder
from compatkit.index.external_embedders import load_factory
from compatkit.index.jobs import load_job, workers_with_claims
from compatkit.index.store import IndexStore
from compatkit.index.upgrade import (
    DEFAULT_LEASE_S,
    UpgradeStatus,
    claim_batch,
    commit_batch,
    compute_batch,
    job_status,
    release_claims,
    run_backfill,
)

logger = logging.getLogger(__name__)

BackfillEngine = Literal["local", "torchrun", "ray"]
BACKFILL_ENGINES: tuple[str, ...] = ("local", "torchrun", "ray")
TORCHRUN_PREFIX = "torchrun-rank"
RAY_PREFIX = "ray-"


def backfill(
    store: IndexStore | str | Path, job: int, *, engine: BackfillEngine = "local",
    workers: int = 1, embedders: str | None = None, lease_s: float = DEFAULT_LEASE_S,
    env: Mapping[str, str] | None = None, device: str = "auto",
) -> UpgradeStatus:
    """Run upgrade job ``job`` to its end (or a pause) on ``engine`` with ``workers`` workers.

    Args:
        store: the store, or its folder.
        engine: ``local`` (in this process; 1 worker), ``torchrun`` or ``ray``.
        embedders: ``"module:function"`` returning {version: Embedder} for the workers to use
            instead of the versions' stored specs (tests, custom models); None uses the specs.
        lease_s: seconds after which a worker's unfinished claim is taken over by another.
        env: extra environment variables for the worker processes.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.

    Raises:
        ValueError: unknown engine, bad worker count, or several local workers.
        CompatkitError: the workers failed (a rerun resumes where they stopped).
    """
    if engine not in BACKFILL_ENGINES:
        raise ValueError(f"engine must be one of {', '.join(BACKFILL_ENGINES)}, got {engine!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if engine == "local":
        if workers != 1:
            raise ValueError(f"the local engine runs 1 worker in this process, got {workers}; "
                             "use engine 'torchrun' or 'ray' for more")
        st = store if isinstance(store, IndexStore) else IndexStore(store)
        if embedders is not None:
            st = IndexStore(st.root, embedders=load_embedders(embedders), device=st.device)
        return run_backfill(st, job, lease_s=lease_s)
    root = store.root if isinstance(store, IndexStore) else Path(store)
    if engine == "torchrun":
        return launch_torchrun(root, job, workers=workers, embedders=embedders, lease_s=lease_s,
                               env=env, device=device)
    return run_ray_backfill(root, job, workers=workers, embedders=embedders, lease_s=lease_s,
                            env=env, device=device)


# ------------------------------------------------------------------ shared helpers


def load_embedders(spec: str | None) -> dict[str, Embedder] | None:
    """The embedders named by ``"module:function"`` (the function returns {version: Embedder}).

    Raises:
        ValueError: a malformed spec, or a function that does not return a mapping.
        CompatkitError: the module cannot be imported or lacks the function.
    """
    if spec is None:
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"embedders must be 'module:function', got {spec!r}")
    out = load_factory(spec, what="embedders function")[0]()
    if not isinstance(out, Mapping):
        raise ValueError(f"{spec} must return a mapping of version -> embedder, got "
                         f"{type(out).__name__}")
    return dict(out)


def worker_device(requested: str, local_rank: int) -> str:
    """The torch device of a worker: ``cuda:<local_rank mod #GPUs>`` for ``auto`` with CUDA or
    for ``cuda``, else ``cpu``.

    Raises:
        ValueError: an unknown device, or ``cuda`` without CUDA.
    """
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise ValueError("device 'cuda' was asked for, but CUDA is not available")
    if requested == "cpu" or not has_cuda:
        return "cpu"
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def claimed_workers(store: IndexStore, job: int, prefix: str) -> list[str]:
    """Names starting with ``prefix`` that hold uncommitted, unreleased claims of ``job``."""
    with store.read() as con:
        return workers_with_claims(con, job, prefix)


def release_stale(store: IndexStore, job: int, prefix: str) -> int:
    """Release the uncommitted claims of workers named ``prefix*`` (none of them may be alive);
    returns how many batches became free."""
    return sum(release_claims(store, job, worker=w) for w in claimed_workers(store, job, prefix))


def _worker_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` plus a PYTHONPATH through which workers import this compatkit."""
    package_parent = str(Path(__file__).resolve().parents[2])
    extra = dict(env or {})
    paths = [package_parent, extra.pop("PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")]
    extra["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return extra


# ------------------------------------------------------------------ torchrun


def launch_torchrun(
    root: str | Path, job: int, *, workers: int = 2, embedders: str | None = None,
    lease_s: float = DEFAULT_LEASE_S, max_restarts: int = 3, env: Mapping[str, str] | None = None,
    device: str = "auto", timeout_s: float | None = None,
) -> UpgradeStatus:
    """Run the job on ``workers`` torchrun processes of this machine; returns its status.

    Claims left by ranks of an earlier run are released first (no rank of ours is alive).

    Raises:
        CompatkitError: torchrun exited non-zero (more failures than ``max_restarts``); the
            committed batches stay, a rerun resumes.
    """
    root = Path(root).resolve()
    store = IndexStore(root)
    freed = release_stale(store, job, TORCHRUN_PREFIX)
    if freed:
        logger.info("released %d batches claimed by ranks of an earlier run", freed)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={workers}", f"--max-restarts={max_restarts}",
           "-m", "compatkit.index.distributed", "--store", str(root), "--job", str(job),
           "--lease-s", str(lease_s), "--device", device]
    if embedders is not None:
        cmd += ["--embedders", embedders]
    run_env = {**os.environ, **_worker_env(env)}
    run_env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=run_env, timeout=timeout_s, check=False)
    status = job_status(store, job)
    store.close()
    if proc.returncode != 0:
        raise CompatkitError(f"torchrun backfill of job {job} exited with code "
                             f"{proc.returncode} at {status.done}/{status.total} of phase "
                             f"{status.phase}; rerun to resume")
    return status


def torchrun_worker(
    root: str | Path, job: int, *, embedders: str | None = None,
    lease_s: float = DEFAULT_LEASE_S, device: str = "auto",
) -> UpgradeStatus:
    """One torchrun rank: claim, compute and commit batches as ``torchrun-rank<RANK>``.

    SIGTERM or SIGINT (torchrun stopping the group) lets the batch in hand commit, then stops.
    """
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    store = IndexStore(root, embedders=load_embedders(embedders),
                       device=worker_device(device, local_rank))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    status = run_backfill(store, job, worker=f"{TORCHRUN_PREFIX}{rank}", stop=stop,
                          lease_s=lease_s)
    store.close()
    return status


# ------------------------------------------------------------------ Ray Data


class RayBackfillActor:
    """A Ray Data actor holding the models: each input row is one claim-compute-commit turn.

    Output per row: ``batch`` (the committed batch id, -1 when none was free), ``items``.
    """

    def __init__(self, root: str, job: int, prefix: str, embedders: str | None,
                 lease_s: float, device: str) -> None:
        import ray

        ctx = ray.get_runtime_context()
        self.worker = f"{prefix}{ctx.get_actor_id()}"
        on_gpu = bool(ray.get_gpu_ids()) and device != "cpu"
        self.store = IndexStore(root, embedders=load_embedders(embedders),
                                device="cuda" if on_gpu else "cpu")
        self.job, self.lease_s = job, lease_s

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batches, items = [], []
        for _ in range(len(rows["token"])):
            batch = claim_batch(self.store, self.job, worker=self.worker, lease_s=self.lease_s)
            if batch is None:
                batches.append(-1)
                items.append(0)
                continue
            computed = compute_batch(self.store, batch)
            commit_batch(self.store, self.job, batch.batch_id, computed.vectors,
                         phase=batch.phase, failed=computed.failed)
            batches.append(batch.batch_id)
            items.append(len(batch.items))
        return {"batch": np.asarray(batches, dtype=np.int64),
                "items": np.asarray(items, dtype=np.int64)}


def run_ray_backfill(
    root: str | Path, job: int, *, workers: int = 2, embedders: str | None = None,
    lease_s: float = DEFAULT_LEASE_S, env: Mapping[str, str] | None = None,
    device: str = "auto", max_rounds: int = 10,
) -> UpgradeStatus:
    """Run the job on Ray Data: ``map_batches`` over ``workers`` model actors; returns its status.

    Starts a local Ray instance unless one is initialised (``ray.init(address=...)`` first to
    use a cluster). Each round hands out one turn per batch left; after a round, claims of its
    (finished) actors are released, and the next round takes what dead actors left.

    Raises:
        CompatkitError: Ray is not installed, or the job still runs after ``max_rounds``.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise CompatkitError("the ray engine needs Ray Data: pip install "
                             "'compatkit[ray]'") from None
    root = Path(root).resolve()
    store = IndexStore(root)
    worker_env = _worker_env(env)
    started = not ray.is_initialized()
    previous_path = os.environ.get("PYTHONPATH")
    if started:
        os.environ["PYTHONPATH"] = worker_env["PYTHONPATH"]  # inherited by the local raylet
        ray.init(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": worker_env})
    try:
        gpus = ray.cluster_resources().get("GPU", 0.0) if device != "cpu" else 0.0
        gpus_per_actor = min(1.0, gpus / workers) if gpus else 0.0
        if device == "cuda" and not gpus:
            raise ValueError("device 'cuda' was asked for, but the Ray cluster has no GPU")
        for round_ in range(max_rounds):
            status = job_status(store, job)
            if status.state != "running":
                break
            prefix = f"{RAY_PREFIX}{secrets.token_hex(4)}-"
            turns = _turns_left(store, job, status) + workers
            ds = ray.data.from_items([{"token": i} for i in range(turns)])
            out = ds.map_batches(
                RayBackfillActor, batch_size=1,
                fn_constructor_kwargs={"root": str(root), "job": int(job), "prefix": prefix,
                                       "embedders": embedders, "lease_s": float(lease_s),
                                       "device": device},
                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
                num_gpus=gpus_per_actor)
            done = sum(int(r["items"]) for r in out.iter_rows() if int(r["batch"]) >= 0)
            freed = release_stale(store, job, prefix)
            logger.info("ray round %d: %d items committed, %d batches left by dead actors",
                        round_, done, freed)
        status = job_status(store, job)
        if status.state == "running":
            raise CompatkitError(f"ray backfill of job {job} still runs after {max_rounds} "
                                 f"rounds ({status.done}/{status.total}); rerun to resume")
        return status
    finally:
        store.close()
        if started:
            ray.shutdown()
            if previous_path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = previous_path


def _turns_left(store: IndexStore, job: int, status: UpgradeStatus) -> int:
    """Batches left in the current phase (at least 1, so a phase not yet planned starts)."""
    with store.read() as con:
        batch_size = int(load_job(con, job).options["batch_size"])
    return max(1, math.ceil(max(status.total - status.done, 0) / batch_size))


# ------------------------------------------------------------------ torchrun entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one torchrun rank (``python -m compatkit.index.distributed``)."""
    p = argparse.ArgumentParser(description="one backfill worker of a torchrun group")
    p.add_argument("--store", required=True)
    p.add_argument("--job", type=int, required=True)
    p.add_argument("--embedders", default=None)
    p.add_argument("--lease-s", type=float, default=DEFAULT_LEASE_S)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    status = torchrun_worker(args.store, args.job, embedders=args.embedders,
                             lease_s=args.lease_s, device=args.device)
    logger.info("rank %s stops: job %d %s, %d/%d", os.environ.get("RANK", "0"), status.job,
                status.state, status.done, status.total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
