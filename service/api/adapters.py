"""Per-user adapter routes (metadata, versions, download, upload, delete) and admin rollback."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.adapters import service
from service.adapters.schemas import AdapterOut, AdapterVersionsOut, RollbackIn
from service.adapters.uploads import spool
from service.deps import AdaptersDep, AdminDep, SessionDep, StateDep, UserDep, UserIdPath
from service.errors import AUTH_ERRORS, error_responses
from service.tenancy import authorize_user

router = APIRouter(tags=["adapters"], responses=error_responses(*AUTH_ERRORS))


@router.get("/users/{user_id}/adapter", response_model=AdapterOut)
def get_adapter(user: UserDep, session: SessionDep) -> AdapterOut:
    return service.current(session, user.storage_key)


@router.get("/users/{user_id}/adapter/versions", response_model=AdapterVersionsOut)
def list_adapter_versions(user: UserDep, session: SessionDep) -> AdapterVersionsOut:
    return service.versions(session, user.storage_key)


@router.get(
    "/users/{user_id}/adapter/download",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": "PEFT files as a zip"}},
)
def download_adapter(
    user: UserDep,
    session: SessionDep,
    adapters: AdaptersDep,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    number, data = service.download(session, adapters, user.storage_key, version)
    name = f"adapter-{user.user_id}-v{number}.zip"
    return Response(
        data, media_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


@router.put(
    "/users/{user_id}/adapter",
    status_code=201,
    response_model=AdapterOut,
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
    with state.uploads.slot(user.storage_key):  # 429 while this user's (or the server's) uploads are busy
        body = await spool(request.stream())  # size-capped by BodySizeLimit (uploads get their own cap)
        with body:
            return await run_in_threadpool(service.upload, session, adapters, user.storage_key, user.pk, body)


@router.delete("/users/{user_id}/adapter", status_code=204)
def delete_adapter(user: UserDep, session: SessionDep, adapters: AdaptersDep) -> Response:
    service.delete(session, adapters, user.storage_key)
    return Response(status_code=204)


@router.post("/admin/users/{user_id}/adapter/rollback", response_model=AdapterOut)
def rollback_adapter(user_id: UserIdPath, body: RollbackIn, caller: AdminDep, session: SessionDep) -> AdapterOut:
    user = authorize_user(session, caller, user_id)
    return service.rollback(session, user.storage_key, body.version)
