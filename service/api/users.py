"""A user's own account routes: export, erase, rotate key; admin revoke."""

from __future__ import annotations

from typing import IO, Annotated

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel

from service import data_rights, users
from service.adapters.uploads import gated_file
from service.deps import AdaptersDep, AdminUserDep, SessionDep, StateDep, UserDep
from service.errors import AUTH_ERRORS, error_responses
from service.jobs.queue import erased_notice

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
        **error_responses(507),
    },
)
def export_user(user: UserDep, session: SessionDep, adapters: AdaptersDep, state: StateDep) -> Response:
    def write(out: IO[bytes]) -> str:
        data_rights.export_archive(session, adapters, user, out)
        return f"oppu-export-{user.user_id}.zip"

    # Behind the download gate (429 while this user's, or the server's, downloads are busy); written to a temp
    # file and streamed from it: an export never sits in memory whole.
    return gated_file(state.downloads, user.storage_key, write)


def get_erase_hooks(state: StateDep) -> data_rights.EraseHooks:
    """An erase ends the user's keys (this replica first, then every replica), engine rows and WAL frames."""
    return data_rights.EraseHooks(
        revoke=state.queue.publish_revoked, erased=erased_notice(state.queue), checkpoint=state.db.checkpoint
    )


EraseHooksDep = Annotated[data_rights.EraseHooks, Depends(get_erase_hooks)]


@router.delete("/users/{user_id}", status_code=204)
def erase_user(user: UserDep, session: SessionDep, adapters: AdaptersDep, hooks: EraseHooksDep) -> Response:
    data_rights.erase_user(session, adapters, user, hooks)
    return Response(status_code=204)


@router.post("/users/{user_id}/keys/rotate", response_model=KeyOut)
def rotate_key(user: UserDep, session: SessionDep, state: StateDep) -> KeyOut:
    return KeyOut(user_id=user.user_id, api_key=users.rotate_key(session, user, state.queue.publish_revoked))


@router.post("/admin/users/{user_id}/keys/revoke", response_model=RevokedOut)
def revoke_keys(user: AdminUserDep, session: SessionDep, state: StateDep) -> RevokedOut:
    return RevokedOut(user_id=user.user_id, revoked=users.revoke_keys(session, user, state.queue.publish_revoked))
