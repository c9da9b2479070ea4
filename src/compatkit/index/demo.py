"""The system demo: a collection built with the old model, upgraded hot to a compatible new
model while a client keeps querying it, with the client's accuracy over time.

``run_system_demo`` takes two model artifact folders (the new one declared compatible with the
old, e.g. trained with BCT) and a dataset's images. It writes the gallery images as PNG files
(the items' sources), builds the collection with the old model, then runs the backfill in a
thread while the caller's thread plays the client: every round it searches all queries (new
model) and records the top-1 accuracy of the live answers next to the fraction backfilled.
The end points are checked against ``compatkit.eval`` (cross-test and self-test CMC@1).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compatkit.errors import CompatkitError
from compatkit.index.collection import ItemInput
from compatkit.index.embedders import ArtifactEmbedder
from compatkit.index.store import IndexStore
from compatkit.index.upgrade import job_status, run_backfill

logger = logging.getLogger(__name__)

COLLECTION = "demo"


@dataclass(frozen=True)
class DemoPoint:
    """One client round: the fraction backfilled when it began, the top-1 accuracy of the live
    answers, which versions' vectors answered top-1, and the seconds since the upgrade began."""

    fraction: float
    accuracy: float
    answered_by: dict[str, int]
    elapsed_s: float


@dataclass(frozen=True)
class SystemDemoResult:
    """Accuracy before the upgrade (old/old), every client round during it, and the
    ``compatkit.eval`` reference values of the end points (new/old and new/new CMC@1)."""

    old_accuracy: float
    points: tuple[DemoPoint, ...]
    reference_cross: float
    reference_self: float
    store_dir: Path
    job: int
    old_version: str
    new_version: str


def run_system_demo(
    old_model: str | Path, new_model: str | Path, images: np.ndarray, labels: np.ndarray, *,
    work_dir: str | Path, n_queries: int = 200, ordering: str = "random", batch_size: int = 64,
    seed: int = 0, batch_pause_s: float = 0.0, device: str = "cpu",
    on_point: Callable[[DemoPoint], None] | None = None,
) -> SystemDemoResult:
    """Build, upgrade hot and query a collection; return the accuracy over time.

    Args:
        old_model, new_model: model artifact folders; the new manifest must declare
            ``compatible_with`` the old version (BCT and friends do).
        images: (N, C, H, W) uint8 at the models' input size. labels: (N,) int.
        work_dir: a new or empty folder for the sources and the store.
        n_queries: images held out as queries (drawn with ``seed``); the rest is the gallery.
        ordering: backfill order (``random``, ``uncertainty``, ...).
        batch_size: items per backfill batch.
        batch_pause_s: sleep after each committed batch (slows the backfill so that the
            client sees more intermediate states).
        on_point: called with each client round as it is measured (the CLI prints them).

    Raises:
        ValueError: bad shapes or counts. CompatkitError: ``work_dir`` is not empty, or the
            models cannot be used together.
    """
    images, labels = _check_data(images, labels, n_queries)
    work_dir = Path(work_dir)
    if work_dir.exists() and any(work_dir.iterdir()):
        raise CompatkitError(f"work_dir {work_dir} is not empty; the demo needs a fresh folder")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(images))
    q_idx, g_idx = np.sort(perm[:n_queries]), np.sort(perm[n_queries:])
    sources = _write_sources(work_dir / "sources", images[g_idx])

    store = IndexStore(work_dir / "store", device=device)
    old_info = store.register_artifact(old_model)
    new_info = store.register_artifact(new_model)
    old_v, new_v = old_info.name, new_info.name  # type: ignore[union-attr]
    coll = store.create_collection(COLLECTION, old_v)
    for start in range(0, len(g_idx), 256):
        coll.add([ItemInput(str(int(i)), source=s, metadata={"label": int(labels[i])})
                  for i, s in zip(g_idx[start:start + 256], sources[start:start + 256],
                                  strict=True)])
    old_emb, new_emb = store.embedder(old_v), store.embedder(new_v)
    if not isinstance(old_emb, ArtifactEmbedder) or not isinstance(new_emb, ArtifactEmbedder):
        raise CompatkitError("the demo needs two model artifacts")
    q_old = old_emb.embed_images(images[q_idx])
    q_new = new_emb.embed_images(images[q_idx])
    q_labels = labels[q_idx]
    old_accuracy = _client_round(coll, q_old, old_v, q_labels)[0]

    ref_cross, ref_self = _references(old_emb, new_emb, images[g_idx], labels[g_idx], q_new,
                                      q_labels)
    status = coll.start_upgrade(new_v, strategy="hot-refresh", ordering=ordering, seed=seed,
                                batch_size=batch_size)
    stop = threading.Event()

    def throttle(_status: object) -> None:
        if batch_pause_s > 0:
            stop.wait(batch_pause_s)

    errors: list[BaseException] = []

    def backfill() -> None:
        try:
            run_backfill(store, status.job, stop=stop, on_batch=throttle)
        except BaseException as err:  # surfaced in the client thread below
            errors.append(err)

    started = time.perf_counter()
    worker = threading.Thread(target=backfill, name="demo-backfill", daemon=True)
    points: list[DemoPoint] = []

    def measure() -> None:
        fraction = job_status(store, status.job).fraction
        acc, answered = _client_round(coll, q_new, new_v, q_labels)
        point = DemoPoint(fraction, acc, answered, time.perf_counter() - started)
        points.append(point)
        logger.info("backfilled %5.1f%%  top-1 accuracy %.4f", 100 * fraction, acc)
        if on_point is not None:
            on_point(point)

    measure()  # the new model serves at once, before any item is backfilled
    worker.start()
    try:
        while worker.is_alive():
            measure()
        measure()  # after the last batch
    finally:
        stop.set()
        worker.join()
    if errors:
        raise errors[0]
    return SystemDemoResult(old_accuracy, tuple(points), ref_cross, ref_self,
                            work_dir / "store", status.job, old_v, new_v)


def _check_data(images: np.ndarray, labels: np.ndarray,
                n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {images.dtype} "
                         f"{images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    if not 1 <= n_queries < len(images):
        raise ValueError(f"n_queries must lie in [1, {len(images) - 1}], got {n_queries}")
    return images, labels.astype(np.int64)


def _write_sources(folder: Path, images: np.ndarray) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{i:06d}.png"
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        Image.fromarray(arr).save(path)
        paths.append(str(path.resolve()))
    return paths


def _client_round(coll, queries: np.ndarray, version: str,
                  labels: np.ndarray) -> tuple[float, dict[str, int]]:
    """Top-1 accuracy of the live answers to every query, and who answered."""
    results = coll.search_batch(queries, version=version, k=1)
    correct, answered = 0, {}
    for res, label in zip(results, labels.tolist(), strict=True):
        if res.hits:
            top = res.hits[0]
            correct += int(top.metadata.get("label") == label)
            answered[top.version] = answered.get(top.version, 0) + 1
    return correct / len(labels), answered


def _references(old_emb: ArtifactEmbedder, new_emb: ArtifactEmbedder, gallery: np.ndarray,
                g_labels: np.ndarray, q_new: np.ndarray,
                q_labels: np.ndarray) -> tuple[float, float]:
    """CMC@1 of new queries against the old and the new gallery, by ``compatkit.eval``."""
    from compatkit.eval.metrics import retrieval_metrics

    g_old = old_emb.embed_images(gallery)
    g_new = new_emb.embed_images(gallery)
    cross = retrieval_metrics(q_new, q_labels, g_old, g_labels, metrics=["cmc@1"])["cmc@1"]
    self_ = retrieval_metrics(q_new, q_labels, g_new, g_labels, metrics=["cmc@1"])["cmc@1"]
    return float(cross), float(self_)
