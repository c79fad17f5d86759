"""History and profile routes for one user."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.api.routing import WholeThreadRoute
from service.deps import HistoryWriteTurn, SessionDep, StateDep, UserDep
from service.errors import AUTH_ERRORS, error_responses
from service.history import service
from service.history.schemas import HistoryAppendIn, HistoryAppendOut, HistoryPage, ProfileIn, ProfileOut
from service.jobs import service as jobs

router = APIRouter(
    route_class=WholeThreadRoute, prefix="/users/{user_id}", tags=["history"], responses=error_responses(*AUTH_ERRORS)
)


@router.post("/history", status_code=201, response_model=HistoryAppendOut, responses=error_responses(429))
def append_history(
    body: HistoryAppendIn, user: UserDep, _turn: HistoryWriteTurn, session: SessionDep, state: StateDep
) -> HistoryAppendOut:
    out = service.append(session, user, body, service.HistoryQuota.from_settings(state.settings))
    threshold = state.settings.retrain_after_new_items
    if threshold and out.added:  # behaviour shift -> retrain (after commit)
        jobs.maybe_auto_retrain(session, state.queue, user.pk, user.storage_key, threshold)
    return out


@router.get("/history", response_model=HistoryPage)
def list_history(
    user: UserDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> HistoryPage:
    return service.page(session, user, limit=limit, cursor=cursor)


@router.put("/profile", response_model=ProfileOut, responses=error_responses(429))
def put_profile(body: ProfileIn, user: UserDep, _turn: HistoryWriteTurn, session: SessionDep) -> ProfileOut:
    return service.set_profile(session, user, body.text)


@router.get("/profile", response_model=ProfileOut)
def get_profile(user: UserDep, session: SessionDep) -> ProfileOut:
    return service.get_profile(session, user)
