"""AppState: the long-lived objects of one API process, built by the lifespan and read by deps."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.adapters.cache import AdapterCache
from service.adapters.service import AdapterContext
from service.adapters.store import AdapterStore
from service.config import Settings
from service.history.service import UserCorpus
from service.inference.runtime import ModelRuntime
from service.jobs.queue import JobQueue
from service.metrics import Metrics
from service.ratelimit import FailedAuthLimiter
from service.retrieval.bm25 import BM25Cache


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    admin_key: str
    bm25: BM25Cache[UserCorpus]
    store: AdapterStore
    runtime: ModelRuntime | None = None
    adapters: AdapterContext | None = None  # set once the model is loaded (needs its shapes)
    cache: AdapterCache | None = None
    queue: JobQueue | None = None
    metrics: Metrics = field(default_factory=Metrics)
    auth_limiter: FailedAuthLimiter = field(default_factory=lambda: FailedAuthLimiter(20, 60.0))
