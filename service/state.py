"""AppState: the long-lived objects of one API process, built by the composition root and read by deps."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from service.adapters.service import AdapterContext
from service.adapters.store import AdapterStore
from service.adapters.uploads import UploadGate
from service.batching.tenant_gate import TenantGate
from service.config import Settings
from service.db.session import Database
from service.engine.base import Engine
from service.generation.prepare import Preparer
from service.history.service import UserCorpus
from service.jobs.queue import JobQueue
from service.jobs.tasks import JobContext
from service.metrics import Metrics
from service.notices.outbox import NoticePoller
from service.ratelimit import FailedAuthLimiter
from service.retrieval.bm25 import BM25Cache
from service.single_flight import SingleFlight
from service.streams import StreamRegistry


@dataclass
class AppState:
    settings: Settings
    db: Database
    admin_key: str
    bm25: BM25Cache[UserCorpus]
    store: AdapterStore
    adapters: AdapterContext
    engine: Engine  # the generation engine (OPPU_ENGINE)
    preparer: Preparer  # the one preparation step of every generating route
    queue: JobQueue
    jobs: JobContext
    metrics: Metrics
    auth_limiter: FailedAuthLimiter
    uploads: UploadGate
    downloads: UploadGate  # adapter downloads and exports (the same gate class, its own counts)
    streams: StreamRegistry  # streams in flight per key: revoking a key ends them
    history_writes: TenantGate  # a user's history writes at once (OPPU_HISTORY_WRITES_PER_USER_MAX)
    stopping: threading.Event  # set at shutdown: background listeners end
    notices: NoticePoller | None = None  # the outbox poller (started with the state)
    reaper: threading.Thread | None = None  # embedded default: the job reaper (service/jobs/worker.run_reaper)
    # The probe routes' work, one run at a time however many callers (they are outside every request cap).
    readiness: SingleFlight[tuple[dict[str, object], int]] = field(default_factory=SingleFlight)
    scrape: SingleFlight[bytes] = field(default_factory=SingleFlight)

    @property
    def session_factory(self) -> sessionmaker[Session]:
        return self.db.session_factory
