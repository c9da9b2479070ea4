"""The base of every typed config section: unknown keys are errors and values are frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A frozen pydantic model that refuses unknown keys (``temprature: 0.05`` is an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
