"""GET /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import StateDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(state.engine.stats(), state.queue.depth()), media_type=CONTENT_TYPE_LATEST)
