"""A user's own account routes: export, erase, rotate key; admin revoke."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service import data_rights, users
from service.deps import AdaptersDep, AdminDep, SessionDep, StateDep, UserDep, UserIdPath
from service.errors import AUTH_ERRORS, error_responses
from service.tenancy import authorize_user

router = APIRouter(tags=["users"], responses=error_responses(*AUTH_ERRORS))


class KeyOut(BaseModel):
    user_id: str
    api_key: str


class RevokedOut(BaseModel):
    user_id: str
    revoked: int


@router.get(
    "/users/{user_id}/export",
    response_class=Response,
    responses={
        200: {"content": {"application/zip": {}}, "description": "history, profile and adapters"},
    },
)
def export_user(user: UserDep, session: SessionDep, adapters: AdaptersDep) -> StreamingResponse:
    archive = tempfile.TemporaryFile()  # noqa: SIM115 - closed by _chunks once streamed (an export never sits in memory whole)
    try:
        data_rights.export_archive(session, adapters, user, archive)
    except BaseException:
        archive.close()
        raise
    name = f"oppu-export-{user.user_id}.zip"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(_chunks(archive), media_type="application/zip", headers=headers)


def _chunks(archive: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    with archive:
        archive.seek(0)
        while chunk := archive.read(size):
            yield chunk


@router.delete("/users/{user_id}", status_code=204)
def erase_user(user: UserDep, session: SessionDep, adapters: AdaptersDep) -> Response:
    data_rights.erase_user(session, adapters, user)
    return Response(status_code=204)


@router.post("/users/{user_id}/keys/rotate", response_model=KeyOut)
def rotate_key(user: UserDep, session: SessionDep, state: StateDep) -> KeyOut:
    return KeyOut(user_id=user.user_id, api_key=users.rotate_key(session, user, state.queue.publish_revoked))


@router.post("/admin/users/{user_id}/keys/revoke", response_model=RevokedOut)
def revoke_keys(user_id: UserIdPath, caller: AdminDep, session: SessionDep, state: StateDep) -> RevokedOut:
    user = authorize_user(session, caller, user_id)
    return RevokedOut(user_id=user.user_id, revoked=users.revoke_keys(session, user, state.queue.publish_revoked))
