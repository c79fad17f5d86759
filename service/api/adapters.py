"""Per-user adapter routes (metadata, versions, download, upload, delete) and admin rollback."""

from __future__ import annotations

from typing import IO, Annotated

from fastapi import APIRouter, Query, Request, Response

from service.adapters import service
from service.adapters.schemas import AdapterOut, AdapterVersionsOut, RollbackIn
from service.adapters.uploads import gated_file, spool
from service.api.routing import WholeThreadRoute
from service.deps import AdaptersDep, AdminUserDep, CallerDep, SessionDep, StateDep, UserDep
from service.errors import AUTH_ERRORS, error_responses
from service.threads import run_to_its_end

router = APIRouter(route_class=WholeThreadRoute, tags=["adapters"], responses=error_responses(*AUTH_ERRORS))


@router.get("/users/{user_id}/adapter", response_model=AdapterOut)
def get_adapter(user: UserDep, session: SessionDep) -> AdapterOut:
    return service.current(session, user.storage_key)


@router.get("/users/{user_id}/adapter/versions", response_model=AdapterVersionsOut)
def list_adapter_versions(user: UserDep, session: SessionDep) -> AdapterVersionsOut:
    return service.versions(session, user.storage_key)


@router.get(
    "/users/{user_id}/adapter/download",
    response_class=Response,
    responses={
        200: {"content": {"application/zip": {}}, "description": "PEFT files as a zip"},
        **error_responses(507),
    },
)
def download_adapter(
    user: UserDep,
    caller: CallerDep,
    session: SessionDep,
    adapters: AdaptersDep,
    state: StateDep,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    def write(out: IO[bytes]) -> str:
        number = service.download(session, adapters, user.storage_key, version, out)
        return f"adapter-{user.user_id}-v{number}.zip"

    # 429 while this user's (or the server's) downloads are busy; streamed from a temp file on disk; a revoked
    # key (rotation, erase) ends it
    return gated_file(state.downloads, user.storage_key, write, ends=state.streams.watch(caller.key_hash))


@router.put(
    "/users/{user_id}/adapter",
    status_code=201,
    response_model=AdapterOut,
    responses=error_responses(408, 409, 507),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
                "application/gzip": {"schema": {"type": "string", "format": "binary"}},  # a .tar.gz
            },
        }
    },
)
async def upload_adapter(
    request: Request, user: UserDep, adapters: AdaptersDep, session: SessionDep, state: StateDep
) -> AdapterOut:
    # The body first (size-capped by BodySizeLimit, within the body deadline), then the gate: a stalled body
    # holds only its own user's receiving slot, never the server's upload gate.
    with state.uploads.receiving(user.storage_key):
        body = await spool(request.stream(), state.settings.upload_body_timeout_s)
    with body, state.uploads.slot(user.storage_key):  # 429 while this user's (or the server's) uploads are busy
        return await run_to_its_end(service.upload, session, adapters, user.storage_key, user.pk, body)


@router.delete("/users/{user_id}/adapter", status_code=204)
def delete_adapter(user: UserDep, session: SessionDep, adapters: AdaptersDep) -> Response:
    service.delete(session, adapters, user.storage_key)
    return Response(status_code=204)


@router.post("/admin/users/{user_id}/adapter/rollback", response_model=AdapterOut)
def rollback_adapter(body: RollbackIn, user: AdminUserDep, session: SessionDep) -> AdapterOut:
    return service.rollback(session, user.storage_key, body.version)
