"""Request/response schemas for history and profile (length caps are part of the contract)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_FIELD = 20_000
MAX_META_BYTES = 16_384
# Deeper metadata was stored, then every page of the user's history failed to serialise (pydantic stops at a
# depth of ~255): refused at the append instead, far below that.
MAX_META_DEPTH = 32


def _storable(value: str) -> str:
    # PostgreSQL text cannot hold U+0000 (SQLite can): reject it on both so that they answer alike.
    if "\x00" in value:
        raise ValueError("text must not contain NUL (U+0000) characters")
    # A lone surrogate ("\ud800" in JSON) is no Unicode character: it cannot be encoded (sealed or stored) as UTF-8.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("text must be valid Unicode (no lone surrogates such as \\ud800)") from exc
    return value


def _depth(value: Any) -> int:
    """How deeply JSON objects/arrays nest in `value` (a scalar: 0), iteratively."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


SafeStr = Annotated[str, AfterValidator(_storable)]
ClientId = Annotated[SafeStr, Field(min_length=1, max_length=128)]


class HistoryItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: ClientId | None = None
    input: Annotated[SafeStr, Field(max_length=MAX_FIELD)] | None = None
    output: Annotated[SafeStr, Field(min_length=1, max_length=MAX_FIELD)]
    kind: Annotated[SafeStr, Field(min_length=1, max_length=64)] | None = None
    metadata: dict[str, Any] | None = None
    timestamp: datetime | None = None

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        # Stored in UTC (SQLite keeps no offset); naive means UTC. 0001-01-01T00:00+14:00 has no UTC value.
        if value is None:
            return None
        try:
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError as exc:
            raise ValueError("timestamp is out of range in UTC") from exc

    @field_validator("metadata")
    @classmethod
    def _meta_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        import json

        if value is None:
            return None
        if _depth(value) > MAX_META_DEPTH:
            raise ValueError(f"metadata nests deeper than {MAX_META_DEPTH} levels")
        # allow_nan=False: NaN/Infinity are not JSON (PostgreSQL rejects them, SQLite turns them into null).
        if len(json.dumps(value, default=str, allow_nan=False)) > MAX_META_BYTES:
            raise ValueError(f"metadata is larger than {MAX_META_BYTES} bytes as JSON")
        _storable(json.dumps(value, default=str, ensure_ascii=False))  # keys and strings: no lone surrogates
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

    text: Annotated[SafeStr, Field(max_length=MAX_FIELD)]


class ProfileOut(BaseModel):
    text: str
    source: str
    updated_at: datetime
