"""Every read and write of the ``vectors`` and ``side_vectors`` rows, and every move of a
vector between the ``current``, ``previous`` and ``next`` slots.

This module owns the rule that keeps search caches honest: a change of an item's ``current``
vector is, in the same transaction, either logged (``db.log_changes``: caches replay it) or
followed by ``db.bump_epoch`` (caches rebuild). Every write path goes through a function here.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from compatkit.index.db import bump_epoch, in_chunks, item_keys, item_rows, log_changes
from compatkit.index.vectors import as_vectors, to_blob

Slot = Literal["current", "previous", "next"]
#: (version, transformed_from, data) of one stored vector.
VectorRow = tuple[str, str | None, bytes]

_IN_COLLECTION = "item IN (SELECT key FROM items WHERE collection=?)"


@dataclass(frozen=True)
class NewItem:
    """An item to write with every vector it gets: slot -> (version, transformed_from, vector),
    and side-info version -> vector."""

    id: str
    source: str | None
    metadata: str
    vectors: Mapping[str, tuple[str, str | None, np.ndarray]]
    side: Mapping[str, np.ndarray]


# --------------------------------------------------------------------- items


def write_items(con: sqlite3.Connection, collection: str,
                items: Sequence[NewItem]) -> tuple[int, int]:
    """Insert or replace ``items`` (an id present is replaced); returns (added, replaced)."""
    now = time.time()
    existing = item_keys(con, collection, [it.id for it in items])
    replaced = [existing[it.id] for it in items if it.id in existing]
    for part, marks in in_chunks(replaced):
        con.execute(f"DELETE FROM vectors WHERE item IN ({marks})", part)
        con.execute(f"DELETE FROM side_vectors WHERE item IN ({marks})", part)
    keys = []
    vector_rows, side_rows = [], []
    for it in items:
        key = existing.get(it.id)
        if key is None:
            cur = con.execute("INSERT INTO items (collection, id, source, metadata, created, "
                              "updated) VALUES (?, ?, ?, ?, ?, ?)",
                              (collection, it.id, it.source, it.metadata, now, now))
            key = int(cur.lastrowid)
        else:
            con.execute("UPDATE items SET source=?, metadata=?, revision=revision+1, "
                        "updated=? WHERE key=?", (it.source, it.metadata, now, key))
        keys.append(key)
        for slot, (version, tf, vec) in it.vectors.items():
            vector_rows.append((key, slot, version, tf, to_blob(vec)))
        side_rows += [(key, sv, to_blob(v)) for sv, v in it.side.items()]
    con.executemany("INSERT INTO vectors VALUES (?, ?, ?, ?, ?)", vector_rows)
    con.executemany("INSERT INTO side_vectors VALUES (?, ?, ?)", side_rows)
    log_changes(con, collection, keys)
    return len(items) - len(replaced), len(replaced)


def delete_items(con: sqlite3.Connection, collection: str, ids: Sequence[str]) -> int:
    """Delete items by id with all their vectors; returns how many existed."""
    keys = list(item_keys(con, collection, ids).values())
    for part, marks in in_chunks(keys):
        con.execute(f"DELETE FROM items WHERE key IN ({marks})", part)
    log_changes(con, collection, keys)
    return len(keys)


# --------------------------------------------------------------------- reads


def item_vectors(con: sqlite3.Connection, key: int) -> list[tuple[Slot, str, str | None, bytes]]:
    """(slot, version, transformed_from, data) of every vector of item ``key``."""
    return con.execute("SELECT slot, version, transformed_from, data FROM vectors WHERE item=?",
                       (key,)).fetchall()


def item_side_versions(con: sqlite3.Connection, key: int) -> list[str]:
    """The side-info versions item ``key`` has a vector of, sorted."""
    return [r[0] for r in con.execute("SELECT version FROM side_vectors WHERE item=? "
                                      "ORDER BY version", (key,))]


def vector_counts(con: sqlite3.Connection,
                  collection: str) -> list[tuple[Slot, str, str | None, int]]:
    """(slot, version, transformed_from, count) of the collection's vectors."""
    return con.execute(
        "SELECT v.slot, v.version, v.transformed_from, count(*) FROM vectors v "
        "JOIN items i ON i.key = v.item WHERE i.collection=? "
        "GROUP BY v.slot, v.version, v.transformed_from", (collection,)).fetchall()


def current_vectors(con: sqlite3.Connection, collection: str,
                    keys: Sequence[int] | None = None) -> list[tuple[int, str, str | None, bytes]]:
    """(item, version, transformed_from, data) of the current vectors of the collection, or
    of the items ``keys`` only."""
    if keys is None:
        return con.execute(
            "SELECT v.item, v.version, v.transformed_from, v.data FROM vectors v "
            "JOIN items i ON i.key = v.item WHERE i.collection=? AND v.slot='current'",
            (collection,)).fetchall()
    rows = []
    for part, marks in in_chunks(list(keys)):
        rows += con.execute(f"SELECT item, version, transformed_from, data FROM vectors "
                            f"WHERE slot='current' AND item IN ({marks})", part).fetchall()
    return rows


def side_vectors_of(con: sqlite3.Connection, version: str,
                    keys: Sequence[int]) -> dict[int, bytes]:
    """item -> data of the ``version`` side vectors of the items ``keys``."""
    out: dict[int, bytes] = {}
    for part, marks in in_chunks(list(keys)):
        out.update({int(r[0]): r[1] for r in con.execute(
            f"SELECT item, data FROM side_vectors WHERE version=? AND item IN ({marks})",
            [version, *part])})
    return out


@dataclass(frozen=True)
class Candidate:
    """An item as an upgrade phase sees it: its current, previous and target-slot vectors."""

    key: int
    id: str
    source: str | None
    current: VectorRow
    previous: tuple[str, bytes] | None
    target: tuple[str, str | None] | None
    side: bytes | None


def candidates(con: sqlite3.Connection, collection: str, target_slot: Slot,
               side_version: str | None) -> list[Candidate]:
    """Every item of the collection with a current vector, by key."""
    rows = con.execute(
        "SELECT i.key, i.id, i.source, c.version, c.transformed_from, c.data, pv.version, "
        "pv.data, t.version, t.transformed_from, s.data FROM items i "
        "JOIN vectors c ON c.item = i.key AND c.slot = 'current' "
        "LEFT JOIN vectors pv ON pv.item = i.key AND pv.slot = 'previous' "
        "LEFT JOIN vectors t ON t.item = i.key AND t.slot = ? "
        "LEFT JOIN side_vectors s ON s.item = i.key AND s.version = ? "
        "WHERE i.collection = ? ORDER BY i.key",
        (target_slot, side_version or "", collection)).fetchall()
    return [Candidate(int(key), item_id, source, (cv, ctf, cdata),
                      None if pv is None else (pv, pdata), None if tv is None else (tv, ttf), sdata)
            for (key, item_id, source, cv, ctf, cdata, pv, pdata, tv, ttf, sdata) in rows]


def unrestorable(con: sqlite3.Connection, collection: str) -> list[tuple[str, int]]:
    """(version, count) of current vectors that have no previous vector to restore."""
    return con.execute(
        f"SELECT version, count(*) FROM vectors c WHERE slot='current' AND {_IN_COLLECTION} AND "
        "NOT EXISTS (SELECT 1 FROM vectors p WHERE p.item=c.item AND p.slot='previous') "
        "GROUP BY version", (collection,)).fetchall()


# --------------------------------------------------------------------- upgrade moves


def write_upgraded(
    con: sqlite3.Connection, collection: str, pairs: np.ndarray, vectors: np.ndarray, *,
    old: str, new: str, kind: Literal["refresh", "transform"],
    placement: Literal["live", "aside"],
) -> int:
    """Write the ``new`` vectors of the (key, revision) ``pairs`` whose items are unchanged since
    they were claimed: into ``current`` (keeping the first old vector in ``previous``) for a
    live phase, into ``next`` for an aside one. Returns how many were written."""
    keys = [int(k) for k in pairs[:, 0]]
    revs = {k: row[2] for k, row in item_rows(con, keys).items()}
    slots: dict[int, dict[str, tuple[str, str | None]]] = {}
    for part, marks in in_chunks(keys):
        for item, slot, version, tf in con.execute(
                f"SELECT item, slot, version, transformed_from FROM vectors "
                f"WHERE item IN ({marks})", part):
            slots.setdefault(int(item), {})[slot] = (version, tf)
    target_slot = "next" if placement == "aside" else "current"
    tf_new = old if kind == "transform" else None
    todo = []
    for (key, rev), vec in zip(pairs.tolist(), vectors, strict=True):
        if revs.get(key) != rev:
            continue  # deleted or replaced since the phase started
        have = slots.get(key, {}).get(target_slot)
        if have is not None and have[0] == new and (kind == "transform" or have[1] is None):
            continue  # already holds a new vector (e.g. re-added during the upgrade)
        if kind == "transform" and slots.get(key, {}).get("current", ("",))[0] != old:
            continue  # its stored vector changed version since the claim
        todo.append((key, vec))
    if not todo:
        return 0
    checked = as_vectors(np.stack([v for _, v in todo]), vectors.shape[1],
                         what=f"committed {new!r} vectors")
    written = [k for k, _ in todo]
    if target_slot == "current":  # keep the first old vector of each item for a rollback
        kept = [k for k in written if "previous" in slots.get(k, {})]
        for part, marks in in_chunks(kept):
            con.execute(f"DELETE FROM vectors WHERE slot='current' AND item IN ({marks})", part)
        for part, marks in in_chunks([k for k in written if "previous" not in slots.get(k, {})]):
            con.execute(f"UPDATE vectors SET slot='previous' WHERE slot='current' AND "
                        f"item IN ({marks})", part)
    else:
        for part, marks in in_chunks(written):
            con.execute(f"DELETE FROM vectors WHERE slot='next' AND item IN ({marks})", part)
    con.executemany("INSERT INTO vectors VALUES (?, ?, ?, ?, ?)",
                    [(k, target_slot, new, tf_new, to_blob(v))
                     for k, v in zip(written, checked, strict=True)])
    if target_slot == "current":
        log_changes(con, collection, written)
    return len(written)


def switch_in_next(con: sqlite3.Connection, collection: str) -> None:
    """Make every ``next`` vector current, keeping the replaced one as ``previous``."""
    con.execute(f"DELETE FROM vectors WHERE slot='previous' AND {_IN_COLLECTION} AND item IN "
                "(SELECT item FROM vectors WHERE slot='next')", (collection,))
    con.execute(f"UPDATE vectors SET slot='previous' WHERE slot='current' AND {_IN_COLLECTION} "
                "AND item IN (SELECT item FROM vectors WHERE slot='next')", (collection,))
    con.execute(f"UPDATE vectors SET slot='current' WHERE slot='next' AND {_IN_COLLECTION}",
                (collection,))
    bump_epoch(con, collection)


def restore_previous(con: sqlite3.Connection, collection: str) -> None:
    """Make every ``previous`` vector current again and drop every ``next`` one."""
    con.execute(f"DELETE FROM vectors WHERE slot='current' AND {_IN_COLLECTION} AND item IN "
                "(SELECT item FROM vectors WHERE slot='previous')", (collection,))
    con.execute(f"UPDATE vectors SET slot='current' WHERE slot='previous' AND {_IN_COLLECTION}",
                (collection,))
    con.execute(f"DELETE FROM vectors WHERE slot='next' AND {_IN_COLLECTION}", (collection,))
    bump_epoch(con, collection)


def drop_previous(con: sqlite3.Connection, collection: str) -> None:
    """Delete every ``previous`` vector of the collection (current ones are unchanged)."""
    con.execute(f"DELETE FROM vectors WHERE slot='previous' AND {_IN_COLLECTION}", (collection,))
