"""errors: the handlers' statuses for what is not a bug (a saturated connection pool)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.errors import install_error_handlers


def test_an_exhausted_connection_pool_is_503_with_retry_after_not_500() -> None:
    # One tenant's concurrent requests can hold every pooled connection for a while; the others' requests
    # then waited the pool's timeout and got a 500 (the pool's TimeoutError is no DBAPIError).
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/users/x")
    @app.get("/v1/models")
    def busy() -> None:
        raise PoolTimeout("QueuePool limit of size 10 overflow 20 reached")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/users/x")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["code"] == "database_busy"
        assert client.get("/v1/models").json()["error"]["code"] == "database_busy"
