"""PAG (service/jobs/profile.py): a generated profile is stored as cleaned text, on every database."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from service.generation import service as generation
from tests.conftest import admin_headers, bearer, create_user, running_app
from tests.factories import add_history

LONE_SURROGATE = "\ud800"


def test_a_generated_profile_with_nul_or_a_lone_surrogate_is_stored_without_them(
    tmp_path: Path, db_url: str, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SmolLM2's token 190 decodes to NUL: PostgreSQL text cannot hold it (DataError, a 500 `internal_error`
    # with sealing off), and a lone surrogate cannot be encoded as UTF-8 (sealed or stored) anywhere.
    generated, stored = f"\x00likes\x00 tea{LONE_SURROGATE} and maps ", "likes tea\ufffd and maps"
    real_complete = generation.complete

    async def dirty_complete(*args: Any, **kwargs: Any) -> list[generation.Completion]:
        done = await real_complete(*args, **kwargs)
        return [dataclasses.replace(c, text=generated) for c in done]

    monkeypatch.setattr(generation, "complete", dirty_complete)
    with running_app(tmp_path, tiny_model_path, db_url, seal_at_rest=False) as client:
        key = create_user(client, "pag")
        add_history(client, "pag", key, n=3)
        r = client.post("/admin/users/pag/profile/generate", headers=admin_headers())
        assert r.status_code == 200, r.text[:300]
        assert r.json()["text"] == stored and r.json()["source"] == "generated"
        again = client.get("/users/pag/profile", headers=bearer(key))
        assert again.status_code == 200 and again.json()["text"] == stored
