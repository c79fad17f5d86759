"""After crashes the store and SQL disagree; start-up reconciliation brings them back in line, and a version
whose files vanished is a 404 JSON on download, never a 500."""

from __future__ import annotations

import os
import time
from pathlib import Path

from service.adapters import service as adapter_service
from service.db.session import unit_of_work
from tests.conftest import app_state, bearer, create_user, running_app
from tests.factories import lora_zip, make_lora, storage_key, upload
from tests.models import load_base


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_reconcile_and_missing_files(tmp_path: Path, tiny_model_path: Path) -> None:
    lora = make_lora(load_base(tiny_model_path), tmp_path / "lora", seed=3, r=4, targets=("q_proj", "v_proj"))
    with running_app(tmp_path, tiny_model_path) as client:
        key = create_user(client, "rec")
        for _ in range(3):
            assert upload(client, "rec", key, lora_zip(lora)).status_code == 201
        state, owner = app_state(client), storage_key(client, "rec")
        store = state.store
        assert store.delete_version(owner, 3)  # the current version's files are lost (a crash, a bad disk)
        r = client.get("/users/rec/adapter/download", headers=bearer(key))
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        orphan_old = store.publish(owner, 9, store.read_files(owner, 2))  # files no row names
        orphan_young = store.publish(owner, 10, store.read_files(owner, 2))
        _age(orphan_old, 7200)
        stale_tmp = store.stage(store.read_files(owner, 2), owner)
        _age(stale_tmp, 7200)
        with unit_of_work(state.session_factory) as session:
            done = adapter_service.reconcile(session, store, older_than_s=3600)
        assert done == {"tmp": 1, "rows_without_files": 1, "orphan_dirs": 1}
        assert not orphan_old.exists() and orphan_young.exists() and not stale_tmp.exists()
        versions = client.get("/users/rec/adapter/versions", headers=bearer(key)).json()
        assert versions["current_version"] == 2 and [v["version"] for v in versions["versions"]] == [2, 1]
        assert client.get("/users/rec/adapter/download", headers=bearer(key)).status_code == 200
        gen = {"prompt": "hi", "max_new_tokens": 2, "temperature": 0, "retrieval_k": 0}
        assert client.post("/users/rec/generate", json=gen, headers=bearer(key)).json()["adapter_version"] == 2
