"""Model versions and the relations declared between them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status

from compatkit.index.service.deps import AdminDep, StoreDep
from compatkit.index.service.schemas import (
    ArtifactRegister,
    CalibrationFields,
    CalibrationPublic,
    RelationCreate,
    RelationPublic,
    RelationsPublic,
    VersionCreate,
    VersionPublic,
    VersionsPublic,
)
from compatkit.index.versions import Relation, VersionInfo

router = APIRouter(tags=["versions"])


def version_public(info: VersionInfo) -> VersionPublic:
    """The public view of a version (the embedder by kind only, never a server path)."""
    return VersionPublic(name=info.name, dim=info.dim, normalized=info.normalized,
                         kind=info.kind, embedder=str(info.embedder.get("kind", "none")))


def relation_public(rel: Relation) -> RelationPublic:
    """The public view of a relation."""
    calibration = None if rel.calibration is None else CalibrationPublic(
        **rel.calibration.to_json())
    return RelationPublic(kind=rel.kind, old=rel.old, new=rel.new, artifact=rel.artifact,
                          side_version=rel.side_version, origin=rel.origin,
                          description=rel.describe(), calibration=calibration)


def _pair_vectors(body: CalibrationFields) -> dict[str, Any]:
    """The paired sample's arrays, read from the server files the body names."""
    from compatkit.artifacts import load_vectors_file

    files = {"from_vectors": body.from_vectors, "to_vectors": body.to_vectors}
    return {"calibrate": body.calibrate,
            **{name: None if path is None else load_vectors_file(path).vectors
               for name, path in files.items()}}


@router.get("/versions", response_model=VersionsPublic)
def list_versions(store: StoreDep) -> VersionsPublic:
    """Every registered version."""
    data = [version_public(v) for v in store.versions()]
    return VersionsPublic(data=data, count=len(data))


@router.get("/versions/{version}", response_model=VersionPublic)
def get_version(version: str, store: StoreDep) -> VersionPublic:
    """One registered version."""
    return version_public(store.version(version))


@router.post("/versions", response_model=VersionPublic, status_code=status.HTTP_201_CREATED)
def register_version(body: VersionCreate, store: StoreDep, _: AdminDep) -> VersionPublic:
    """Register a version by name and dimension (idempotent)."""
    embedder = None if body.embedder is None else body.embedder.model_dump()
    return version_public(store.register_version(
        body.name, dim=body.dim, normalized=body.normalized, kind=body.kind, embedder=embedder))


@router.post("/versions/artifacts", status_code=status.HTTP_201_CREATED,
             response_model=VersionPublic | RelationPublic)
def register_artifact(body: ArtifactRegister, store: StoreDep,
                      _: AdminDep) -> VersionPublic | RelationPublic:
    """Register a model (with its manifest's relations) or a transformation artifact."""
    out = store.register_artifact(body.path, new=body.new, side_version=body.side_version,
                                  **_pair_vectors(body))
    return relation_public(out) if isinstance(out, Relation) else version_public(out)


@router.get("/relations", response_model=RelationsPublic)
def list_relations(store: StoreDep) -> RelationsPublic:
    """Every declared relation."""
    data = [relation_public(r) for r in store.relations()]
    return RelationsPublic(data=data, count=len(data))


@router.post("/relations", response_model=RelationPublic, status_code=status.HTTP_201_CREATED)
def declare_relation(body: RelationCreate, store: StoreDep, _: AdminDep) -> RelationPublic:
    """Declare ``new`` compatible with ``old``, or a transformation ``old -> new``."""
    if body.kind == "compatible":
        return relation_public(store.declare_compatible(body.new, body.old))
    return relation_public(store.declare_transform(body.old, body.new, body.artifact or "",
                                                   side_version=body.side_version,
                                                   **_pair_vectors(body)))
