"""Upgrades of a collection: start, status, pause, resume, rollback, finalise."""

from __future__ import annotations

from fastapi import APIRouter, status

from compatkit.errors import UnknownNameError
from compatkit.index import upgrade as up
from compatkit.index.service.deps import AdminDep, CollectionDep
from compatkit.index.service.schemas import UpgradeCreate, UpgradePublic

router = APIRouter(prefix="/collections/{name}/upgrades", tags=["upgrades"])


def upgrade_public(st: up.UpgradeStatus) -> UpgradePublic:
    """The public view of a job's status."""
    return UpgradePublic(**st.as_dict())


def _job_of(coll: CollectionDep, job: int) -> int:
    """``job`` if it belongs to the collection, else 404."""
    if up.job_status(coll.store, job).collection != coll.name:
        raise UnknownNameError(f"collection {coll.name!r} has no upgrade job {job}")
    return job


@router.post("", response_model=UpgradePublic, status_code=status.HTTP_201_CREATED)
def start(body: UpgradeCreate, coll: CollectionDep, _: AdminDep) -> UpgradePublic:
    """Start an upgrade to ``version`` with a strategy and a backfill order."""
    options = body.model_dump(exclude={"version"})
    return upgrade_public(coll.start_upgrade(body.version, **options))


@router.get("/current", response_model=UpgradePublic)
def current(coll: CollectionDep) -> UpgradePublic:
    """The status of the collection's latest upgrade job (fraction done, rate, ETA)."""
    return upgrade_public(coll.upgrade_status())


@router.get("/{job}", response_model=UpgradePublic)
def get_status(job: int, coll: CollectionDep) -> UpgradePublic:
    """The status of one upgrade job of the collection."""
    return upgrade_public(up.job_status(coll.store, _job_of(coll, job)))


@router.post("/{job}/pause", response_model=UpgradePublic)
def pause(job: int, coll: CollectionDep, _: AdminDep) -> UpgradePublic:
    """Stop handing out batches."""
    return upgrade_public(up.pause(coll.store, _job_of(coll, job)))


@router.post("/{job}/resume", response_model=UpgradePublic)
def resume(job: int, coll: CollectionDep, _: AdminDep) -> UpgradePublic:
    """Hand out batches again."""
    return upgrade_public(up.resume(coll.store, _job_of(coll, job)))


@router.post("/{job}/rollback", response_model=UpgradePublic)
def rollback(job: int, coll: CollectionDep, _: AdminDep) -> UpgradePublic:
    """Return the collection to the old version with the vectors it had."""
    return upgrade_public(up.rollback(coll.store, _job_of(coll, job)))


@router.post("/{job}/finalize", response_model=UpgradePublic)
def finalize(job: int, coll: CollectionDep, _: AdminDep) -> UpgradePublic:
    """Drop the old vectors; the upgrade can no longer be rolled back."""
    return upgrade_public(up.finalize(coll.store, _job_of(coll, job)))
