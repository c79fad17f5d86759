"""GET /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import StateDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    cache, runtime = state.cache, state.runtime
    m = state.metrics
    m.slots_in_use.set(len(cache.slot_keys()) if cache is not None else 0)
    m.pinned.set(len(cache.pinned()) if cache is not None else 0)
    m.queue_depth.set(runtime.scheduler.queued if runtime is not None else 0)
    m.job_queue_depth.set(state.queue.depth() if state.queue is not None else 0)
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
