"""Model versions, declared relations between them, and how a query reaches stored vectors.

A query of version ``q`` may score vectors stored in the space of version ``s`` only when

- ``q == s``;
- ``q`` is declared backward-compatible with ``s`` (BCT, RACT, UniBCT, ...: a ``compatible``
  relation, from a manifest's ``compatible_with`` or declared by a user); or
- a transformation maps ``q`` into ``s`` (a ``transform`` relation without side-information):
  the query vector is transformed, then scored.

Anything else raises ``IncompatibleSpacesError`` naming both versions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from compatkit.errors import IncompatibleSpacesError
from compatkit.score_calibration import ScoreCalibration

RelationKind = Literal["compatible", "transform"]
VersionKind = Literal["model", "side_info"]

#: Version, collection and item-independent names: letters, digits and ``._:@+-``.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+\-]{0,127}$")


def check_name(name: object, what: str) -> str:
    """``name`` if it is a valid version or collection name, else ``ValueError``."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"{what} name must be 1-128 characters of letters, digits and ._:@+- "
                         f"starting with a letter or digit, got {name!r}")
    return name


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version: the space its vectors live in.

    ``embedder`` is a JSON-able spec of how sources are embedded in this version
    (``{"kind": "artifact", "path": ...}``, ``{"kind": "hash", "seed": ...}`` or
    ``{"kind": "none"}``); see ``compatkit.index.embedders``.
    """

    name: str
    dim: int
    normalized: bool
    kind: VersionKind = "model"
    embedder: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})


@dataclass(frozen=True)
class Relation:
    """A declared relation from version ``old`` to version ``new``.

    ``compatible``: queries of ``new`` may search vectors of ``old`` as they are.
    ``transform``: the transformation artifact at ``artifact`` maps ``old`` vectors (plus the
    item's ``side_version`` vector when it needs side-information) into ``new``'s space.
    ``calibration``: for a transformation that maps queries (a query adapter), the map of the
    adapted scores onto the scale of ``old``'s own scores, applied before a merged top-k.
    """

    kind: RelationKind
    old: str
    new: str
    artifact: str | None = None
    side_version: str | None = None
    origin: Literal["manifest", "user"] = "user"
    calibration: ScoreCalibration | None = None

    def describe(self) -> str:
        """One line naming the relation, e.g. ``vB compatible with vA``."""
        if self.kind == "compatible":
            return f"{self.new} is compatible with {self.old}"
        side = f" with side-info {self.side_version}" if self.side_version else ""
        calibrated = ", scores calibrated" if self.calibration is not None else ""
        return f"transformation {self.old} -> {self.new}{side}{calibrated}"


@dataclass(frozen=True)
class Route:
    """How a query of ``query_version`` scores vectors stored in ``stored_version``'s space.

    ``via``: ``same`` (identical spaces), ``compatible`` (declared compatibility, vectors as they
    are) or ``transform`` (the query is mapped by ``relation``'s transformation first).
    """

    query_version: str
    stored_version: str
    via: Literal["same", "compatible", "transform"]
    relation: Relation | None = None


def find_route(
    query_version: str, stored_version: str, relations: Iterable[Relation],
    versions: dict[str, VersionInfo],
) -> Route:
    """The route from a query version to a stored version, or ``IncompatibleSpacesError``.

    Raises:
        IncompatibleSpacesError: no declared relation connects the two versions, or a declared
            compatibility joins versions of different dimensions (both versions named).
    """
    if query_version == stored_version:
        return Route(query_version, stored_version, "same")
    relations = list(relations)
    for rel in relations:
        if rel.kind == "compatible" and rel.new == query_version and rel.old == stored_version:
            q, s = versions.get(query_version), versions.get(stored_version)
            if q is not None and s is not None and q.dim != s.dim:
                raise IncompatibleSpacesError(
                    f"version {query_version!r} is declared compatible with {stored_version!r} "
                    f"but their dimensions differ ({q.dim} vs {s.dim})")
            return Route(query_version, stored_version, "compatible", rel)
    for rel in relations:
        if (rel.kind == "transform" and rel.old == query_version and rel.new == stored_version
                and rel.side_version is None):
            return Route(query_version, stored_version, "transform", rel)
    raise IncompatibleSpacesError(
        f"a query of version {query_version!r} cannot search vectors of version "
        f"{stored_version!r}: no declared relation connects them (declare {query_version!r} "
        f"compatible with {stored_version!r}, or register a transformation "
        f"{query_version!r} -> {stored_version!r})")


def can_search(
    query_version: str, stored_version: str, relations: Iterable[Relation],
    versions: dict[str, VersionInfo],
) -> bool:
    """Whether ``find_route`` succeeds for this pair."""
    try:
        find_route(query_version, stored_version, relations, versions)
    except IncompatibleSpacesError:
        return False
    return True
