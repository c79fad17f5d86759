"""Annotated dependency aliases: state, session (commit at end), caller, authorised user."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from service.adapters.service import AdapterContext
from service.db.session import unit_of_work
from service.engine.base import queue_errors
from service.errors import TooManyRequests, Unauthorized
from service.generation.prepare import Preparer
from service.jobs.queue import JobQueue
from service.state import AppState
from service.streams import StreamRegistry
from service.tenancy import (
    USER_ID_MAX,
    USER_ID_PATTERN,
    Caller,
    UserRef,
    authenticate,
    authorize_user,
    parse_bearer,
    require_admin,
)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.oppu
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with unit_of_work(state.session_factory) as session:
        yield session


# scope="function": the commit happens before the response is sent, so a 201 means committed.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def client_address(request: Request) -> str:
    """Whom failed authentications are counted against (the proxy's X-Forwarded-For when it is trusted)."""
    return request.client.host if request.client is not None else "unknown"


# Auth uses its own short unit of work so that long requests (generate) hold no connection.
def get_caller(request: Request, state: StateDep) -> Caller:
    """A valid key is always served; failures are counted per client address (the proxy's X-Forwarded-For
    when it is trusted, see OPPU_FORWARDED_ALLOW_IPS), and an address past its limit gets 429 for bad keys
    only: the failures of others behind the same address can never lock a valid key out."""
    client = client_address(request)
    try:
        token = parse_bearer(request.headers.get("authorization"))
        with unit_of_work(state.session_factory) as session:
            return authenticate(session, token, state.admin_key)
    except Unauthorized:
        wait = state.auth_limiter.retry_after(client)
        state.auth_limiter.record_failure(client)
        if wait is not None:
            raise TooManyRequests("too many failed authentications", headers={"Retry-After": str(wait)}) from None
        raise


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_admin(caller: CallerDep) -> Caller:
    require_admin(caller)
    return caller


AdminDep = Annotated[Caller, Depends(get_admin)]

UserIdPath = Annotated[str, Path(max_length=USER_ID_MAX, description=USER_ID_PATTERN)]


def get_user(user_id: UserIdPath, caller: CallerDep, state: StateDep) -> UserRef:
    with unit_of_work(state.session_factory) as session:
        return authorize_user(session, caller, user_id)


UserDep = Annotated[UserRef, Depends(get_user)]


def get_admin_user(user_id: UserIdPath, caller: AdminDep, state: StateDep) -> UserRef:
    """The user an admin-only route acts on (the admin key first: 401/403; then 404 for no such user)."""
    with unit_of_work(state.session_factory) as session:
        return authorize_user(session, caller, user_id)


AdminUserDep = Annotated[UserRef, Depends(get_admin_user)]


async def history_write_turn(user: UserDep, state: StateDep) -> AsyncIterator[None]:
    """The user's turn to write history (`state.history_writes`): declared before SessionDep, so the request's
    unit of work commits before the turn goes to the user's next write."""
    with queue_errors():  # a user with too many writes at the gate: the queues' 429, by the one rule
        async with state.history_writes.admit(user.storage_key):
            yield


HistoryWriteTurn = Annotated[None, Depends(history_write_turn, scope="function")]


def get_adapters(state: StateDep) -> AdapterContext:
    return state.adapters


AdaptersDep = Annotated[AdapterContext, Depends(get_adapters)]


def get_preparer(state: StateDep) -> Preparer:
    """The one preparation step and the engine behind it: what every generating route takes (and the marker
    by which tests/api/test_cancel_on_disconnect.py finds the generating routes)."""
    return state.preparer


PreparerDep = Annotated[Preparer, Depends(get_preparer)]


def get_streams(state: StateDep) -> StreamRegistry:
    return state.streams


StreamsDep = Annotated[StreamRegistry, Depends(get_streams)]


def get_queue(state: StateDep) -> JobQueue:
    return state.queue


QueueDep = Annotated[JobQueue, Depends(get_queue)]
