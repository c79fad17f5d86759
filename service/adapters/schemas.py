"""Adapter API schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class AdapterOut(BaseModel):
    version: int
    current: bool
    sha256: str
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str
    source: str
    shared_version: int | None
    nbytes: int
    metadata: dict[str, Any] | None
    created_at: datetime
    stale: bool = False  # trained on an older shared task LoRA than the one served now
    trained_on_erased: bool = False  # (shared versions) trained on the history of a user since erased


class AdapterVersionsOut(BaseModel):
    current_version: int | None
    versions: list[AdapterOut]


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=2**31 - 1)
