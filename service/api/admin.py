"""Admin routes: create and delete users."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from service import data_rights, users
from service.api.routing import WholeThreadRoute
from service.api.users import EraseHooksDep
from service.deps import AdaptersDep, AdminDep, AdminUserDep, SessionDep
from service.errors import AUTH_ERRORS, error_responses
from service.tenancy import USER_ID_MAX, USER_ID_PATTERN

router = APIRouter(
    route_class=WholeThreadRoute, prefix="/admin", tags=["admin"], responses=error_responses(*AUTH_ERRORS)
)


class CreateUserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=USER_ID_MAX, pattern=USER_ID_PATTERN)


class CreateUserOut(BaseModel):
    user_id: str
    api_key: str
    recovery_code: str = Field(description="shown once: the owner's own key rotation needs it besides the key")


@router.post("/users", status_code=201, response_model=CreateUserOut, responses=error_responses(409))
def create_user(body: CreateUserIn, _: AdminDep, session: SessionDep) -> CreateUserOut:
    user, key = users.create_user(session, body.user_id)
    return CreateUserOut(user_id=user.user_id, api_key=key, recovery_code=users.issue_recovery_code(session, user))


@router.delete("/users/{user_id}", status_code=204)
def delete_user(user: AdminUserDep, session: SessionDep, adapters: AdaptersDep, hooks: EraseHooksDep) -> Response:
    data_rights.erase_user(session, adapters, user, hooks)
    return Response(status_code=204)
