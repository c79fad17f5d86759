"""GET /metrics (Prometheus text format), behind OPPU_METRICS_TOKEN when it is set."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.routing import WholeThreadRoute
from service.deps import StateDep, client_address
from service.errors import TooManyRequests, Unauthorized
from service.ratelimit import FailedAuthLimiter
from service.tenancy import parse_bearer

router = APIRouter(route_class=WholeThreadRoute, tags=["metrics"])


def require_metrics_token(request: Request, token: str, limiter: FailedAuthLimiter) -> None:
    """A missing or wrong token is a failed auth for the client address, as a bad API key is (OPPU_AUTH_*).
    A blocked address gets 429 before its token is compared: an operator's token may be guessable, and a
    200 among the 429s would let a blocked guesser go on at full speed."""
    client = client_address(request)
    wait = limiter.retry_after(client)
    if wait is not None:
        raise TooManyRequests("too many failed authentications", headers={"Retry-After": str(wait)})
    try:
        given = parse_bearer(request.headers.get("authorization"))
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("the metrics token is required", headers={"WWW-Authenticate": "Bearer"})
    except Unauthorized:
        limiter.record_failure(client)
        raise


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, state: StateDep) -> Response:
    """Prometheus text format; with OPPU_METRICS_TOKEN set, only for "Authorization: Bearer <token>"."""
    token = state.settings.metrics_token
    if token is not None and token.get_secret_value():
        require_metrics_token(request, token.get_secret_value(), state.auth_limiter)  # in memory: no thread
    # One scrape at a time (its SQL counts), shared by the callers meanwhile: a flood holds one thread.
    body = await state.scrape.run(lambda: state.metrics.render(state.engine.stats()))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
