"""Job API schemas."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def as_utc(value: datetime) -> datetime:
    # SQLite keeps no offset: stored values are UTC, so a naive one is UTC (an RFC 3339 date-time needs one).
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


class JobOut(BaseModel):
    job_id: str
    kind: str
    status: JobStatus
    progress: float
    adapter_version: int | None
    error: str | None
    attempts: int
    created_at: UtcDatetime
    finished_at: UtcDatetime | None
