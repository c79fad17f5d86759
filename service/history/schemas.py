"""Request/response schemas for history and profile (length caps are part of the contract)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_FIELD = 20_000
MAX_META_BYTES = 16_384

ClientId = Annotated[str, Field(min_length=1, max_length=128)]


class HistoryItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: ClientId | None = None
    input: Annotated[str, Field(max_length=MAX_FIELD)] | None = None
    output: Annotated[str, Field(min_length=1, max_length=MAX_FIELD)]
    kind: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    metadata: dict[str, Any] | None = None
    timestamp: datetime | None = None

    @field_validator("metadata")
    @classmethod
    def _meta_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        import json

        if value is not None and len(json.dumps(value, default=str)) > MAX_META_BYTES:
            raise ValueError(f"metadata is larger than {MAX_META_BYTES} bytes as JSON")
        return value


class HistoryAppendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[HistoryItemIn], Field(min_length=1, max_length=1000)]


class HistoryAppendOut(BaseModel):
    added: int
    duplicates: int
    ids: list[str]


class HistoryItemOut(BaseModel):
    id: str
    input: str | None
    output: str
    kind: str | None
    metadata: dict[str, Any] | None
    timestamp: datetime | None
    created_at: datetime


class HistoryPage(BaseModel):
    items: list[HistoryItemOut]
    next_cursor: str | None


class ProfileIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Annotated[str, Field(max_length=MAX_FIELD)]


class ProfileOut(BaseModel):
    text: str
    source: str
    updated_at: datetime
