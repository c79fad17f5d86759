"""Admin training routes: retrain a user's adapter or the shared one, read or cancel a job, generate a profile."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from pydantic import BaseModel

from service.adapters import service as adapter_service
from service.adapters.schemas import AdapterVersionsOut
from service.api.routing import WholeThreadRoute
from service.db.models import SHARED_OWNER
from service.deps import AdminDep, AdminUserDep, PreparerDep, QueueDep, SessionDep, UserIdPath
from service.errors import AUTH_ERRORS, SERVING_ERRORS, error_responses
from service.history.schemas import ProfileOut
from service.jobs import service
from service.jobs.profile import generate_profile
from service.jobs.schemas import JobOut

STALE_PAGE_MAX = 500  # stale users a retrain-stale request makes jobs for (one transaction)

router = APIRouter(
    route_class=WholeThreadRoute, prefix="/admin", tags=["training"], responses=error_responses(*AUTH_ERRORS)
)


@router.post("/users/{user_id}/retrain", status_code=202, response_model=JobOut, responses=error_responses(409))
def retrain_user(user: AdminUserDep, session: SessionDep, queue: QueueDep) -> JobOut:
    job, _created = service.request_job(session, queue, "user_retrain", user.storage_key, user.pk, require_history=True)
    return job


@router.post("/shared-adapter/retrain", status_code=202, response_model=JobOut)
def retrain_shared(_: AdminDep, session: SessionDep, queue: QueueDep) -> JobOut:
    job, _created = service.request_job(session, queue, "shared_retrain", SHARED_OWNER, None)
    return job


class BulkRetrainOut(BaseModel):
    jobs: list[JobOut]
    skipped: int = 0  # stale users with another kind of job active (a key rotation) or erased meanwhile
    next_after: int | None = None  # more stale users may follow: POST again with ?after=next_after; None: done


@router.post("/adapters/retrain-stale", status_code=202, response_model=BulkRetrainOut)
def retrain_stale(
    _: AdminDep,
    session: SessionDep,
    queue: QueueDep,
    limit: Annotated[int, Query(ge=1, le=STALE_PAGE_MAX)] = STALE_PAGE_MAX,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> BulkRetrainOut:
    """After the shared LoRA changed: one retrain job per user whose adapter is stale, or their active one (a
    user that cannot get one now is skipped and counted: one tenant's key rotation never blocks everyone's
    retrain). A page of at most `limit` users per request, in one short transaction (a whole deployment's jobs in
    one would hold SQLite's writer from every tenant): `next_after` names where the next page starts."""
    owners = adapter_service.stale_owners(session, after, limit)
    jobs, skipped = service.request_retrains(session, queue, owners)
    next_after = owners[-1][1] if len(owners) == limit else None
    return BulkRetrainOut(jobs=jobs, skipped=skipped, next_after=next_after)


@router.get("/shared-adapter", response_model=AdapterVersionsOut)
def shared_adapter_versions(_: AdminDep, session: SessionDep) -> AdapterVersionsOut:
    """The shared task LoRA's kept versions; `trained_on_erased` marks those trained on the history of a user
    erased since (POST /admin/shared-adapter/retrain trains a new one on the users there are now)."""
    return adapter_service.versions(session, SHARED_OWNER)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: Annotated[str, PathParam(max_length=64)], _: AdminDep, session: SessionDep) -> JobOut:
    return service.get(session, job_id)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: Annotated[str, PathParam(max_length=64)], _: AdminDep, session: SessionDep) -> JobOut:
    """A queued or running job ends as `cancelled` (a running attempt stops at its next heartbeat and publishes
    nothing); a finished job is returned as it is."""
    return service.cancel(session, job_id)


@router.post("/users/{user_id}/profile/generate", response_model=ProfileOut, responses=error_responses(*SERVING_ERRORS))
async def generate_user_profile(user_id: UserIdPath, caller: AdminDep, preparer: PreparerDep) -> ProfileOut:
    return await generate_profile(preparer, caller, user_id)
