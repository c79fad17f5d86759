"""Liveness and readiness."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.api.routing import WholeThreadRoute
from service.deps import StateDep
from service.inference.loader import serving_dtype
from service.jobs.queue import queue_checks
from service.state import AppState

router = APIRouter(route_class=WholeThreadRoute, tags=["health"])


class ReadyOut(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, bool]
    dtype: str | None = None  # the served weights' dtype (OPPU_DTYPE; "auto" follows the CPU's bf16 support)
    dtype_reason: str | None = None  # why: "cpu has amx_bf16", "OPPU_DTYPE=float32", ...
    # Reported, not required (a replica keeps serving without them): {"redis": false} while Redis is down means
    # retrains wait (the worker re-enqueues them once it is back) and notices reach this replica only.
    optional: dict[str, bool] = {}


@router.get("/health")  # vLLM's name: vllm-router waits for it before it routes to a replica
@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut, "description": "Not ready"}})
async def readyz(state: StateDep) -> JSONResponse:
    # One check at a time, shared by the callers meanwhile: a flood of probes holds one thread and connection.
    body, status = await state.readiness.run(lambda: _readiness(state))
    return JSONResponse(body, status)


def _readiness(state: AppState) -> tuple[dict[str, object], int]:
    checks = {"model": state.engine.stats().healthy, "database": state.db.ping()}
    ok = all(checks.values())
    dtype = serving_dtype(state.settings)  # the loader's rule on the same settings and machine
    status = "ready" if ok else "not_ready"
    body: dict[str, object] = {"status": status, "checks": checks, "dtype": dtype.name, "dtype_reason": dtype.reason}
    body["optional"] = queue_checks(state.queue)
    return body, 200 if ok else 503
