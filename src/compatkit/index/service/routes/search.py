"""Search a whole collection with a vector of a declared version or a raw image."""

from __future__ import annotations

import base64
import binascii
import json

from fastapi import APIRouter, Response

from compatkit.index.search import SearchResult
from compatkit.index.service.deps import CollectionDep
from compatkit.index.service.schemas import SearchRequest, SearchResponse

router = APIRouter(prefix="/collections/{name}", tags=["search"])


def search_response(result: SearchResult) -> Response:
    """The public view of a search result (``SearchResponse``), written as JSON directly: no
    model validation on the hot path."""
    body = {"query_version": result.query_version,
            "hits": [{"id": h.id, "score": h.score, "version": h.version,
                      "transformed_from": h.transformed_from, "metadata": h.metadata}
                     for h in result.hits]}
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


def decode_image(image_b64: str) -> bytes:
    """The bytes of a base64 image. Raises ValueError for invalid base64."""
    try:
        return base64.b64decode(image_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image_b64 is not valid base64") from None


@router.post("/search", response_model=SearchResponse)
def search(req: SearchRequest, coll: CollectionDep) -> Response:
    """Top-k over the whole collection; versions mix only through declared relations."""
    if req.image_b64 is not None:
        return search_response(coll.search(source=decode_image(req.image_b64), k=req.k,
                                           with_metadata=req.with_metadata))
    return search_response(coll.search(req.vector, version=req.version, k=req.k,
                                       with_metadata=req.with_metadata))
