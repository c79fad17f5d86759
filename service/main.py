"""create_app(settings=None): the FastAPI app with its lifespan, routers, middleware and error handlers.
The state is built at start-up by the composition root (see lifespan); nothing is created here."""

from __future__ import annotations

from fastapi import FastAPI
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from service.api import adapters, admin, generate, health, history, jobs, metrics, openai, users
from service.config import Settings, get_settings
from service.errors import install_error_handlers
from service.lifespan import lifespan
from service.metrics import HttpMetrics, Metrics
from service.middleware import BodySizeLimit, CancelOnDisconnect, InFlightLimit


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="OPPU personal LLM server",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
        redirect_slashes=False,  # "/users/x%2F" must be a 404, never a redirect to "/users/x"
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    for module in (health, admin, users, history, generate, adapters, jobs, metrics, openai):
        app.include_router(module.router)
    app.add_middleware(InFlightLimit, max_requests=settings.max_concurrency)  # 503 beyond OPPU_MAX_CONCURRENCY
    app.add_middleware(  # outside InFlightLimit: a body still arriving holds no request place
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        upload_max_bytes=settings.adapter_max_file_bytes + (1 << 20),
        timeout_s=settings.body_timeout_s,
        upload_timeout_s=settings.upload_body_timeout_s,
        max_receiving=4 * settings.max_concurrency,
        max_receiving_per_client=max(1, settings.max_concurrency // 4),
    )
    app.add_middleware(HttpMetrics, metrics=app.state.metrics)  # counts 413s and 503s too
    app.add_middleware(CancelOnDisconnect)  # every route: a client that leaves ends its engine rows
    if settings.forwarded_allow_ips:  # outermost: every layer sees the real client address
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.forwarded_allow_ips)
    return app
