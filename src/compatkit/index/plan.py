"""Planning an upgrade: its phases (by strategy) and the backfill order of each phase.

A phase covers the items that still lack the new vector in its target slot; it orders them
with ``compatkit.ordering`` (``random``, ``given``, ``uncertainty`` by the old model's
classifier, ``sigma`` by the transformation's uncertainty head).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from compatkit.errors import CompatkitError, IncompatibleSpacesError
from compatkit.index.db import Store, relations, version_map
from compatkit.index.jobs import Job, Phase, transform_relation
from compatkit.index.slots import Candidate, candidates
from compatkit.index.vectors import stack_blobs
from compatkit.index.versions import Relation, VersionInfo, can_search

#: Orderings that need data a live system does not have (new vectors of the gallery).
ANALYSIS_ONLY_ORDERINGS: tuple[str, ...] = ("oracle",)


def check_ordering(name: str, given_order: Sequence[str] | None) -> None:
    """Raise unless ``name`` is a deployable ordering with what it needs.

    Raises:
        UnknownNameError: unknown ordering. ValueError: ``oracle``, or ``given`` without ids.
    """
    from compatkit.ordering import ORDERINGS

    if name in ANALYSIS_ONLY_ORDERINGS:
        raise ValueError(f"ordering {name!r} needs the new vectors of every item and is for "
                         "analysis only; use random, uncertainty, sigma or given")
    ORDERINGS.get(name)  # unknown names raise with suggestions
    if name == "given" and given_order is None:
        raise ValueError("ordering 'given' needs given_order (a list of item ids)")


def plan_phases(
    store: Store, strategy: str, old: str, new: str, ordering: str, then_refresh: bool,
    refresh_ordering: str | None, versions: dict[str, VersionInfo], rels: list[Relation],
) -> tuple[Phase, ...]:
    """The phases of an upgrade ``old`` -> ``new`` by ``strategy`` (see ``upgrade``).

    Raises:
        CompatkitError: the strategy re-embeds sources and ``new`` has no embedder.
        IncompatibleSpacesError: the strategy needs a relation that is not declared.
    """
    new_searches_old = can_search(new, old, rels, versions)
    needs_embedder = strategy in ("hot-refresh", "cold") or then_refresh
    if needs_embedder and not store.has_embedder(new):
        raise CompatkitError(f"strategy {strategy!r} re-embeds sources with {new!r}, which has "
                             "no embedder; register it from a model artifact")
    if strategy == "hot-refresh":
        if not new_searches_old:
            raise IncompatibleSpacesError(
                f"hot-refresh serves {new!r} at once, so {new!r} must be able to search "
                f"{old!r} vectors; declare {new!r} compatible with {old!r} or a query adapter "
                f"(a transformation {new!r} -> {old!r}), or use the 'cold' or 'transform' "
                "strategy")
        return (Phase("refresh", "live", ordering),)
    if strategy == "cold":
        return (Phase("refresh", "aside", ordering),)
    if not any(r.kind == "transform" and r.old == old and r.new == new for r in rels):
        raise IncompatibleSpacesError(f"strategy 'transform' needs a transformation {old!r} -> "
                                      f"{new!r}; register one first")
    phases = [Phase("transform", "live" if new_searches_old else "aside", ordering)]
    if then_refresh:
        phases.append(Phase("refresh", "live", refresh_ordering or ordering))
    return tuple(phases)


def plan_order(store: Store, job: Job, p: int) -> tuple[list[int], int]:
    """(item keys in backfill order, number of items the phase cannot cover) for phase ``p``.

    Raises:
        IncompatibleSpacesError: items the phase cannot cover would be unsearchable by vB.
    """
    phase = job.phases[p]
    rel = (transform_relation(store.relations(), job.old, job.new)
           if phase.kind == "transform" else None)
    side_version = rel.side_version if rel is not None else None
    target_slot = "next" if phase.placement == "aside" else "current"
    with store.read() as con:
        versions, rels = version_map(con), relations(con)
        cands = candidates(con, job.collection, target_slot, side_version)
    eligible, blocked = [], {}
    for c in cands:
        if c.target is not None and c.target[0] == job.new and (
                phase.kind == "transform" or c.target[1] is None):
            continue  # already holds its new vector
        if phase.kind == "refresh":
            ok = c.source is not None
        else:
            ok = c.current[0] == job.old and (side_version is None or c.side is not None)
        if ok:
            eligible.append(c)
        else:
            blocked[c.current[0]] = blocked.get(c.current[0], 0) + 1
    for version, n in blocked.items():
        if phase.placement == "aside" and not can_search(job.new, version, rels, versions):
            why = "no source" if phase.kind == "refresh" else "no transformable vector"
            raise IncompatibleSpacesError(
                f"{n} items of version {version!r} have {why}, so they would keep {version!r} "
                f"vectors that {job.new!r} cannot search; declare {job.new!r} compatible with "
                f"{version!r}, or give these items sources")
    if phase.placement == "live" and p == 0:
        present = {c.current[0] for c in cands}
        for version in present:
            if not can_search(job.new, version, rels, versions):
                raise IncompatibleSpacesError(
                    f"{job.new!r} would serve at once but cannot search the collection's "
                    f"{version!r} vectors; declare the relation or use the 'cold' strategy")
    perm = _compute_order(store, job, phase, eligible, versions)
    return [eligible[i].key for i in perm], sum(blocked.values())


def _compute_order(store: Store, job: Job, phase: Phase, eligible: list[Candidate],
                   versions: dict[str, VersionInfo]) -> np.ndarray:
    """A permutation of ``range(len(eligible))`` by ``compatkit.ordering``."""
    from compatkit.ordering import backfill_order

    n = len(eligible)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    opts = job.options
    name = phase.ordering
    if name == "random":
        return backfill_order(name, n, seed=opts["seed"])
    if name == "given":
        return backfill_order(name, n,
                              order=_given_positions(eligible, opts.get("given_order") or []))
    old = _old_vectors(eligible, job, versions)
    if name == "uncertainty":
        return backfill_order(name, n, old_features=old, classifier=_classifier_of(store, job.old),
                              temperature=opts["temperature"])
    if name == "sigma":
        rel = transform_relation(store.relations(), job.old, job.new)
        side = None
        if rel.side_version is not None:
            if any(c.side is None for c in eligible):
                raise CompatkitError(f"ordering 'sigma' needs a {rel.side_version!r} side vector "
                                     "for every item")
            side = stack_blobs([c.side or b"" for c in eligible], versions[rel.side_version].dim)
        return backfill_order(name, n, sigma=store.transformer(rel).sigma(old, side))
    raise ValueError(f"ordering {name!r} is not deployable in the index")


def _given_positions(eligible: list[Candidate], given_ids: Sequence[str]) -> np.ndarray:
    """Positions of the eligible items in the given id order, then the rest oldest first."""
    index = {c.id: i for i, c in enumerate(eligible)}
    seen: set[str] = set()
    order = []
    for item_id in given_ids:
        if item_id in seen:
            raise ValueError(f"given_order lists item {item_id!r} twice")
        seen.add(item_id)
        if item_id in index:
            order.append(index[item_id])
    listed = set(order)
    order += [i for i in range(len(eligible)) if i not in listed]
    return np.asarray(order, dtype=np.int64)


def _old_vectors(eligible: list[Candidate], job: Job,
                 versions: dict[str, VersionInfo]) -> np.ndarray:
    """The old-version vector of each item (the kept previous one, else the current one)."""
    blobs = []
    for c in eligible:
        if c.previous is not None and c.previous[0] == job.old:
            blobs.append(c.previous[1])
        elif c.current[0] == job.old and c.current[1] is None:
            blobs.append(c.current[2])
        else:
            raise CompatkitError(f"item {c.id!r} has no {job.old!r} vector to order by")
    return stack_blobs(blobs, versions[job.old].dim)


def _classifier_of(store: Store, version: str) -> np.ndarray:
    emb = store.embedder(version)
    weights = getattr(emb, "classifier_weights", lambda: None)()
    if weights is None:
        raise CompatkitError(f"ordering 'uncertainty' needs the classifier of {version!r}'s "
                             "model artifact; this version has none")
    return weights
