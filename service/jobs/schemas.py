"""Job API schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

JobStatus = Literal["queued", "running", "succeeded", "failed"]


class JobOut(BaseModel):
    job_id: str
    kind: str
    status: JobStatus
    progress: float
    adapter_version: int | None
    error: str | None
    attempts: int
    created_at: datetime
    finished_at: datetime | None
