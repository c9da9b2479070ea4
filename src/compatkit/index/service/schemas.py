"""Request and response schemas of the HTTP service (inputs and outputs kept apart).

Every schema refuses unknown fields. Vectors are lists of finite floats whose length is bounded
here and checked against their version's dimension by ``compatkit.index``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Longest vector accepted at the edge (the version's own dimension is checked later).
MAX_VECTOR_LENGTH = 65_536
MAX_ITEMS_PER_REQUEST = 1_000
MAX_K = 1_000
MAX_IMAGE_B64 = 8 * 1024 * 1024

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Vector = Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_VECTOR_LENGTH)]
Name = Annotated[str, Field(min_length=1, max_length=128)]
ItemId = Annotated[str, Field(min_length=1, max_length=512)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorPublic(_Out):
    """Every error answer: one sentence that says what was wrong; nothing was changed."""

    detail: str


# ---------------------------------------------------------------- versions, relations


class HashEmbedderSpec(_In):
    """A deterministic hash embedder (tests and load benchmarks)."""

    kind: Literal["hash"] = "hash"
    seed: int = 0
    anchor_seed: int | None = None
    anchor_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class ImageInputSpec(_In):
    """Sources are images: resized to ``image_size`` (None: as they are), ``in_chans``
    channels, ``(pixels / 255 - mean) / std`` per channel (defaults 0 and 1)."""

    kind: Literal["image"] = "image"
    image_size: Annotated[int, Field(ge=1, le=8192)] | None = None
    in_chans: Literal[1, 3]
    mean: Annotated[list[FiniteFloat], Field(min_length=1, max_length=3)] | None = None
    std: Annotated[list[FiniteFloat], Field(min_length=1, max_length=3)] | None = None


class ArrayInputSpec(_In):
    """Sources are ``.npy`` arrays, fed to the model as they are."""

    kind: Literal["array"] = "array"


class ModelFileEmbedderSpec(_In):
    """An ONNX or TorchScript file on the server; ``input`` None reads the file's own spec."""

    kind: Literal["onnx", "torchscript"]
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    input: Annotated[ImageInputSpec | ArrayInputSpec, Field(discriminator="kind")] | None = None
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 64


class PythonEmbedderSpec(_In):
    """``package.module:factory`` importable on the server, called with ``kwargs``."""

    kind: Literal["python"]
    factory: Annotated[str, Field(min_length=3, max_length=512)]
    kwargs: dict[str, Any] = {}


class VersionCreate(_In):
    """Register a version by hand: vectors only, or with a hash (the default ``kind``), ONNX,
    TorchScript or python embedder (see ``compatkit.index.external_embedders``)."""

    name: Name
    dim: Annotated[int, Field(ge=1, le=MAX_VECTOR_LENGTH)]
    normalized: bool = True
    kind: Literal["model", "side_info"] = "model"
    embedder: HashEmbedderSpec | ModelFileEmbedderSpec | PythonEmbedderSpec | None = None


Path = Annotated[str, Field(min_length=1, max_length=4096)]


class CalibrationFields(_In):
    """A query adapter's score calibration: ``calibrate`` true fits it on a paired sample
    (``from_vectors``, ``to_vectors``: .npy/.npz/.safetensors files on the server, row i one
    item, in the transformation's source and target versions), false removes a stored one,
    absent keeps what is stored."""

    calibrate: bool | None = None
    from_vectors: Path | None = None
    to_vectors: Path | None = None


class ArtifactRegister(CalibrationFields):
    """Register what a model/side-info/transformation artifact folder on the server holds."""

    path: Path
    new: Name | None = None
    side_version: Name | None = None


class VersionPublic(_Out):
    name: str
    dim: int
    normalized: bool
    kind: str
    embedder: str


class VersionsPublic(_Out):
    data: list[VersionPublic]
    count: int


class RelationCreate(CalibrationFields):
    """Declare ``new`` compatible with ``old``, or a transformation artifact ``old -> new``
    (a query adapter when ``old`` is the newer model; see ``CalibrationFields``)."""

    kind: Literal["compatible", "transform"]
    old: Name
    new: Name
    artifact: Path | None = None
    side_version: Name | None = None

    @model_validator(mode="after")
    def _artifact_for_transform(self) -> RelationCreate:
        if self.kind == "transform" and self.artifact is None:
            raise ValueError("a transform relation needs artifact")
        if self.kind == "compatible" and (self.artifact or self.side_version):
            raise ValueError("a compatible relation takes no artifact or side_version")
        if self.kind == "compatible" and (self.calibrate is not None or self.from_vectors
                                          or self.to_vectors):
            raise ValueError("a compatible relation takes no calibration")
        return self


class CalibrationPublic(_Out):
    scale: float
    shift: float
    pairs: int


class RelationPublic(_Out):
    kind: str
    old: str
    new: str
    artifact: str | None
    side_version: str | None
    origin: str
    description: str
    calibration: CalibrationPublic | None = None


class RelationsPublic(_Out):
    data: list[RelationPublic]
    count: int


# ---------------------------------------------------------------- collections, items


class CollectionCreate(_In):
    name: Name
    version: Name
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    side_versions: Annotated[list[Name], Field(max_length=8)] = []


class CollectionPublic(_Out):
    name: str
    serving_version: str
    index: str
    items: int
    current: dict[str, int]
    kept_previous: int
    pending_next: int
    active_job: int | None


class CollectionsPublic(_Out):
    data: list[str]
    count: int


class ItemCreate(_In):
    """An item: a vector (in ``version``, default the serving one) and/or a source to embed."""

    id: ItemId
    source: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    metadata: dict[str, Any] = {}
    vector: Vector | None = None
    version: Name | None = None
    side: dict[Name, Vector] | None = None

    @model_validator(mode="after")
    def _vector_or_source(self) -> ItemCreate:
        if self.vector is None and self.source is None:
            raise ValueError("an item needs a vector or a source")
        if self.version is not None and self.vector is None:
            raise ValueError("version given without a vector")
        return self


class ItemsCreate(_In):
    items: Annotated[list[ItemCreate], Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)]


class ItemsAdded(_Out):
    added: int
    replaced: int


class ItemsDelete(_In):
    ids: Annotated[list[ItemId], Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)]


class ItemsDeleted(_Out):
    deleted: int


class StoredVectorPublic(_Out):
    slot: str
    version: str
    transformed_from: str | None
    vector: list[float] | None = None


class ItemPublic(_Out):
    id: str
    source: str | None
    metadata: dict[str, Any]
    revision: int
    vectors: list[StoredVectorPublic]


class ItemIdsPublic(_Out):
    data: list[str]
    count: int


# ---------------------------------------------------------------- search


class SearchRequest(_In):
    """A vector with its version (default: the serving version), or a raw image (base64)."""

    vector: Vector | None = None
    version: Name | None = None
    image_b64: Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_B64)] | None = None
    k: Annotated[int, Field(ge=1, le=MAX_K)] = 10
    with_metadata: bool = True

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if (self.vector is None) == (self.image_b64 is None):
            raise ValueError("give exactly one of vector or image_b64")
        if self.image_b64 is not None and self.version is not None:
            raise ValueError("an image is embedded by the serving version; do not pass version")
        return self


class HitPublic(_Out):
    id: str
    score: float
    version: str
    transformed_from: str | None
    metadata: dict[str, Any]


class SearchResponse(_Out):
    query_version: str
    hits: list[HitPublic]


# ---------------------------------------------------------------- upgrades


class UpgradeCreate(_In):
    version: Name
    strategy: Literal["hot-refresh", "transform", "cold"] = "hot-refresh"
    ordering: Name = "random"
    seed: int = 0
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 256
    given_order: Annotated[list[ItemId], Field(max_length=10_000_000)] | None = None
    then_refresh: bool = False
    refresh_ordering: Name | None = None
    temperature: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0


class UpgradePublic(_Out):
    job: int
    collection: str
    old_version: str
    new_version: str
    strategy: str
    state: str
    phase: int
    phases: list[str]
    total: int
    done: int
    fraction: float
    written: int
    skipped: int
    failed: int
    rate: float | None
    eta_s: float | None
    created: float
    updated: float
    finished: float | None


# ---------------------------------------------------------------- health


class HealthPublic(_Out):
    status: Literal["ok"]
    collections: int
    worker: str
    worker_error: str | None
