"""POST /users/{id}/generate."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import RuntimeDep, StateDep, UserDep
from service.generation import service
from service.generation.schemas import GenerateIn, GenerateOut

router = APIRouter(prefix="/users/{user_id}", tags=["generate"])


@router.post("/generate", response_model=GenerateOut)
async def generate(body: GenerateIn, user: UserDep, state: StateDep, runtime: RuntimeDep) -> GenerateOut:
    return await service.generate(state.session_factory, runtime, state.bm25, state.settings, user, body)
