"""Collections: create, list, inspect, drop."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from compatkit.index.collection import Collection
from compatkit.index.service.deps import AdminDep, CollectionDep, StoreDep
from compatkit.index.service.schemas import CollectionCreate, CollectionPublic, CollectionsPublic

router = APIRouter(prefix="/collections", tags=["collections"])


def collection_public(coll: Collection) -> CollectionPublic:
    """Counts and state of a collection."""
    return CollectionPublic(**coll.stats().__dict__)


@router.get("", response_model=CollectionsPublic)
def list_collections(store: StoreDep) -> CollectionsPublic:
    """The names of every collection."""
    names = store.collection_names()
    return CollectionsPublic(data=names, count=len(names))


@router.post("", response_model=CollectionPublic, status_code=status.HTTP_201_CREATED)
def create_collection(body: CollectionCreate, store: StoreDep, _: AdminDep) -> CollectionPublic:
    """Create an empty collection served by ``version``."""
    return collection_public(store.create_collection(
        body.name, body.version, index=body.index, side_versions=body.side_versions))


@router.get("/{name}", response_model=CollectionPublic)
def get_collection(coll: CollectionDep) -> CollectionPublic:
    """Item and vector counts of one collection."""
    return collection_public(coll)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def drop_collection(coll: CollectionDep, _: AdminDep) -> Response:
    """Delete a collection with everything in it."""
    coll.store.drop_collection(coll.name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
