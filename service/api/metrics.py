"""GET /metrics (Prometheus text format)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.routing import WholeThreadRoute
from service.deps import StateDep
from service.errors import Unauthorized

router = APIRouter(route_class=WholeThreadRoute, tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(request: Request, state: StateDep) -> Response:
    """Prometheus text format; with OPPU_METRICS_TOKEN set, only for "Authorization: Bearer <token>"."""
    token = state.settings.metrics_token
    if token is not None and token.get_secret_value():
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            raise Unauthorized("the metrics token is required", headers={"WWW-Authenticate": "Bearer"})
    return Response(state.metrics.render(state.engine.stats()), media_type=CONTENT_TYPE_LATEST)
