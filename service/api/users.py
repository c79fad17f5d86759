"""A user's own account routes: export, erase, rotate key (the rule: ROTATE_RULE), rotate the data key (a
background job); admin revoke."""

from __future__ import annotations

from typing import IO, Annotated

from fastapi import APIRouter, Depends, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from service import data_rights, users
from service.adapters.uploads import gated_file
from service.api.routing import WholeThreadRoute
from service.deps import AdaptersDep, AdminUserDep, CallerDep, QueueDep, SessionDep, StateDep, UserDep
from service.errors import AUTH_ERRORS, error_responses
from service.jobs import service as jobs
from service.jobs.queue import erased_notice
from service.jobs.schemas import JobOut

router = APIRouter(route_class=WholeThreadRoute, tags=["users"], responses=error_responses(*AUTH_ERRORS))


class KeyOut(BaseModel):
    user_id: str
    api_key: str
    recovery_code: str = Field(description="the new recovery code (shown once): your next own rotation needs it")


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recovery_code: str | None = Field(
        default=None, max_length=256, description="the owner's current recovery code (the admin needs none)"
    )


ROTATE_RULE = """A new API key and a new recovery code for the user; every older key stops working at once (its
streams end on every replica) and the old recovery code stops working.

**Who may rotate.** The owner, with the current key as the bearer AND a re-authentication: the body's
`recovery_code`, the code returned when the user was created or at the last rotation. A stolen key alone cannot
rotate the owner out: without the valid code the answer is 403 `reauth_required` and nothing changes. The admin
key rotates without a code: that is the recovery path for an owner who lost the code (or whose key leaked)."""


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
def export_user(
    user: UserDep, caller: CallerDep, session: SessionDep, adapters: AdaptersDep, state: StateDep
) -> Response:
    def write(out: IO[bytes]) -> str:
        data_rights.export_archive(session, adapters, user, out)
        return f"oppu-export-{user.user_id}.zip"

    # Behind the download gate (429 while this user's, or the server's, downloads are busy); written to a temp
    # file and streamed from it: an export never sits in memory whole; a revoked key (rotation, erase) ends it.
    return gated_file(state.downloads, user.storage_key, write, ends=state.streams.watch(caller.key_hash))


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


@router.post("/users/{user_id}/keys/rotate", response_model=KeyOut, description=ROTATE_RULE)
def rotate_key(
    user: UserDep, caller: CallerDep, session: SessionDep, state: StateDep, body: RotateIn | None = None
) -> KeyOut:
    code = body.recovery_code if body is not None else None
    new = users.rotate_key(session, user, state.queue.publish_revoked, by_admin=caller.is_admin, recovery_code=code)
    return KeyOut(user_id=user.user_id, api_key=new.api_key, recovery_code=new.recovery_code)


@router.post("/admin/users/{user_id}/keys/revoke", response_model=RevokedOut)
def revoke_keys(user: AdminUserDep, session: SessionDep, state: StateDep) -> RevokedOut:
    return RevokedOut(user_id=user.user_id, revoked=users.revoke_keys(session, user, state.queue.publish_revoked))


DATA_KEY_RULE = """A new data key for the user (encryption at rest), in the background: 202 with the job (kind
`user_key_rotation`; the user polls `GET /users/{user_id}/jobs/{job_id}`, the admin also `GET /admin/jobs/{job_id}`).
The job makes the new key, waits until every replica seals new values under it (OPPU_KEY_RECHECK_S plus a margin),
re-seals the user's history, profile and adapter files, then destroys the old key. The user's data stays readable
throughout. 409 `job_active` (naming the job) while another job of the user (a retrain) is active; 409 `sealing_off`
when the server does not seal; a rotation already under way is returned as is. On the owner's route, a new rotation
comes at most once per OPPU_DATA_KEY_ROTATION_INTERVAL_S after the last that succeeded (429 with Retry-After)."""


DATA_KEY_ERRORS = error_responses(404, 409)


@router.post(
    "/admin/users/{user_id}/keys/rotate-data-key",
    status_code=202,
    response_model=JobOut,
    description=DATA_KEY_RULE,
    responses=DATA_KEY_ERRORS,
)
def rotate_data_key(user: AdminUserDep, session: SessionDep, queue: QueueDep) -> JobOut:
    return jobs.request_key_rotation(session, queue, user.storage_key, user.pk)


@router.post(
    "/users/{user_id}/keys/rotate-data-key",
    status_code=202,
    response_model=JobOut,
    description=DATA_KEY_RULE,
    responses=error_responses(404, 409, 429),
)
def rotate_own_data_key(
    user: UserDep, caller: CallerDep, session: SessionDep, queue: QueueDep, state: StateDep
) -> JobOut:
    # The owner's own: at most this often (429); the admin, on either route, is the recovery path.
    interval = 0.0 if caller.is_admin else state.settings.data_key_rotation_interval_s
    return jobs.request_key_rotation(session, queue, user.storage_key, user.pk, min_interval_s=interval)


@router.get("/users/{user_id}/jobs/{job_id}", response_model=JobOut, responses=error_responses(404))
def get_own_job(user: UserDep, job_id: Annotated[str, PathParam(max_length=64)], session: SessionDep) -> JobOut:
    """One of the user's jobs (a retrain, a data-key rotation); another user's job id answers 404, as none does."""
    return jobs.get_owned(session, user.storage_key, job_id)
