"""Items of a collection: add (insert or replace), get, list, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from compatkit.errors import UnknownNameError
from compatkit.index.collection import Item, ItemInput
from compatkit.index.service.deps import AdminDep, CollectionDep, SettingsDep, check_source
from compatkit.index.service.schemas import (
    ItemIdsPublic,
    ItemPublic,
    ItemsAdded,
    ItemsCreate,
    ItemsDelete,
    ItemsDeleted,
    StoredVectorPublic,
)

router = APIRouter(prefix="/collections/{name}/items", tags=["items"])


def item_public(item: Item) -> ItemPublic:
    """The public view of an item and its vectors."""
    vectors = [StoredVectorPublic(slot=v.slot, version=v.version,
                                  transformed_from=v.transformed_from,
                                  vector=None if v.vector is None else v.vector.tolist())
               for v in item.vectors]
    return ItemPublic(id=item.id, source=item.source, metadata=item.metadata,
                      revision=item.revision, vectors=vectors)


@router.post("", response_model=ItemsAdded)
def add_items(body: ItemsCreate, coll: CollectionDep, settings: SettingsDep,
              _: AdminDep) -> ItemsAdded:
    """Insert or replace items (all or none)."""
    inputs = [ItemInput(id=it.id, source=check_source(it.source, settings),
                        metadata=it.metadata, vector=it.vector, version=it.version, side=it.side)
              for it in body.items]
    result = coll.add(inputs)
    return ItemsAdded(added=result.added, replaced=result.replaced)


@router.get("", response_model=ItemIdsPublic)
def list_items(coll: CollectionDep, offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> ItemIdsPublic:
    """Item ids in insertion order; ``count`` is the collection's total."""
    return ItemIdsPublic(data=coll.list_ids(offset=offset, limit=limit), count=coll.count())


@router.get("/{item_id:path}", response_model=ItemPublic)
def get_item(item_id: str, coll: CollectionDep, with_vectors: bool = False) -> ItemPublic:
    """One item with the slots and versions of its vectors (their values if asked); an id may
    hold ``/`` (as ``index add --images`` gives items in subfolders), encoded or not."""
    return item_public(coll.get(item_id, with_vectors=with_vectors))


@router.delete("/{item_id:path}", status_code=status.HTTP_204_NO_CONTENT)
def delete_item(item_id: str, coll: CollectionDep, _: AdminDep) -> Response:
    """Delete one item (404 when it does not exist); an id may hold ``/``."""
    if coll.delete([item_id]) == 0:
        raise UnknownNameError(f"collection {coll.name!r} has no item {item_id!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/delete", response_model=ItemsDeleted)
def delete_items(body: ItemsDelete, coll: CollectionDep, _: AdminDep) -> ItemsDeleted:
    """Delete several items; ids that do not exist are ignored."""
    return ItemsDeleted(deleted=coll.delete(body.ids))
