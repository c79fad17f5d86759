"""Noisy neighbours: each attack of the tenant-isolation report (H1-H4, and vLLM's "broken adapters and
missing versions under load") runs against a real server while 8 other tenants generate (4 with their own
adapters, half through the OpenAI route). None of their requests may fail, and the attacker gets a 4xx JSON
(or only its own rows fail). H3 and H4 also bound the time the server is unavailable to others."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from sqlalchemy.orm import Session
from transformers import LlamaForCausalLM

from service.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from service.db.migrate import upgrade
from service.db.models import User
from service.db.session import unit_of_work
from service.history import service as history_service
from service.main import create_app
from service.state import AppState
from service.tenancy import UserRef
from tests.conftest import ADMIN_KEY, live_server, make_settings
from tests.factories import make_adapter

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TENANTS = 8
QV = ("q_proj", "v_proj")


class Env:
    def __init__(self, base: str, state: AppState, keys: dict[str, str], adapter: Path) -> None:
        self.base, self.state, self.keys, self.adapter = base, state, keys, adapter


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("noisy")
    db = f"sqlite:///{tmp / 'db.sqlite3'}"
    upgrade(db)
    # The test process plays the proxy (loopback): the client address is X-Forwarded-For's, as behind nginx.
    settings = make_settings(
        tmp, db, str(tiny_model_path), forwarded_allow_ips="127.0.0.1", auth_max_failures=10, auth_failure_window_s=60
    )
    app = create_app(settings)
    base_model = LlamaForCausalLM.from_pretrained(tiny_model_path)
    with live_server(app) as base:
        keys = {}
        for k in range(TENANTS):
            user = f"tenant{k}"
            keys[user] = new_user(base, user)
            if k % 2 == 0:
                folder = make_adapter(base_model, tmp / user, seed=40 + k, r=4, targets=QV)
                assert upload(base, user, keys[user], zip_folder(folder)).status_code == 201
        adapter = make_adapter(base_model, tmp / "template", seed=7, r=4, targets=QV)
        yield Env(base, app.state.oppu, keys, adapter)


def new_user(base: str, user: str) -> str:
    r = httpx.post(f"{base}/admin/users", json={"user_id": user}, headers=ADMIN, timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["api_key"])


def auth(key: str, client: str = "198.51.100.1") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-Forwarded-For": client}


def upload(base: str, user: str, key: str, body: bytes) -> httpx.Response:
    headers = {**auth(key), "Content-Type": "application/zip"}
    return httpx.put(f"{base}/users/{user}/adapter", content=body, headers=headers, timeout=60)


def zip_folder(folder: Path, config: dict[str, Any] | None = None, weights: bytes | None = None) -> bytes:
    cfg = json.loads((folder / CONFIG_NAME).read_text()) | (config or {})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(CONFIG_NAME, json.dumps(cfg))
        zf.writestr(WEIGHTS_NAME, weights if weights is not None else (folder / WEIGHTS_NAME).read_bytes())
    return buf.getvalue()


@contextmanager
def neighbours(env: Env) -> Iterator[Counter[int]]:
    """8 tenants generating back to back (each from its own client address) while the block runs; the
    statuses they got. At least two rounds each are waited for, so the attack overlaps real traffic."""
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    stop = threading.Event()
    rounds = [0] * TENANTS

    def tenant(k: int) -> None:
        user = f"tenant{k}"
        headers = auth(env.keys[user], f"198.51.100.{10 + k}")
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                if k % 2:
                    body = {"model": "personal", "messages": [{"role": "user", "content": f"hi {k}"}], "max_tokens": 6}
                    r = http.post(f"{env.base}/v1/chat/completions", json=body, headers=headers)
                else:
                    body = {"prompt": f"tell me {k}", "max_new_tokens": 6, "temperature": 0.7, "seed": k}
                    r = http.post(f"{env.base}/users/{user}/generate", json=body, headers=headers)
                statuses[r.status_code] += 1
                if r.status_code != 200:
                    errors.append(f"{user}: {r.status_code} {r.text[:200]}")
                rounds[k] += 1

    threads = [threading.Thread(target=tenant, args=(k,)) for k in range(TENANTS)]
    for t in threads:
        t.start()
    try:
        yield statuses
        deadline = time.monotonic() + 60
        floor = min(rounds) + 2
        while min(rounds) < floor and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:5]
    assert statuses[200] >= 2 * TENANTS, statuses


def assert_4xx(r: httpx.Response) -> dict[str, Any]:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    body: dict[str, Any] = r.json()
    assert set(body) >= {"code", "message"}, body
    return body


def test_h1_poisoned_adapters(env: Env) -> None:
    """alpha 1e300 is refused at upload; an adapter at the scale cap whose weights blow the activations up
    (finite once scaled, inf in the forward) fails only its own rows, as 422 generation_failed."""
    key = new_user(env.base, "h1")
    with neighbours(env):
        for config in ({"lora_alpha": 1e300}, {"alpha_pattern": {"q_proj": 1e300}}, {"lora_alpha": -4}):
            assert_4xx(upload(env.base, "h1", key, zip_folder(env.adapter, config)))
        tensors = load_file(str(env.adapter / WEIGHTS_NAME))
        hot = {n: (torch.full_like(t, 1e36) if "lora_B" in n else t) for n, t in tensors.items()}
        tmp = env.adapter.parent / "hot.safetensors"
        save_file(hot, str(tmp))
        r = upload(env.base, "h1", key, zip_folder(env.adapter, {"lora_alpha": 1024}, tmp.read_bytes()))
        assert r.status_code == 201, r.text  # scale 256 (the cap), weights finite: accepted
        outcomes: Counter[tuple[int, str | None]] = Counter()
        for seed in range(4):
            body = {"prompt": "x", "max_new_tokens": 4, "temperature": 1.0, "seed": seed, "retrieval_k": 0}
            r = httpx.post(f"{env.base}/users/h1/generate", json=body, headers=auth(key), timeout=60)
            outcomes[(r.status_code, r.json().get("code"))] += 1
        assert outcomes == Counter({(422, "generation_failed"): 4}), outcomes


def test_h2_bad_keys_behind_the_proxy_lock_out_only_the_attacker(env: Env) -> None:
    with neighbours(env):
        statuses = Counter(
            httpx.get(f"{env.base}/users/tenant0/history", headers=auth("oppu_wrong", "203.0.113.66")).status_code
            for _ in range(15)
        )
        assert statuses == Counter({401: 10, 429: 5}), statuses
        # Another client behind the same proxy is not locked out by the attacker's failures.
        r = httpx.get(f"{env.base}/users/tenant0/history", headers=auth("oppu_typo", "198.51.100.99"))
        assert r.status_code == 401, r.text
    # The attacker's own address with a valid key is still served: failures never refuse a good key.
    r = httpx.get(f"{env.base}/users/tenant0/history", headers=auth(env.keys["tenant0"], "203.0.113.66"))
    assert r.status_code == 200


def test_h3_pattern_bomb_is_refused_fast(env: Env) -> None:
    key = new_user(env.base, "h3")
    bomb = {f"layers.{i}.self_attn.q_proj": 4 for i in range(4096)}
    with neighbours(env):
        for config in ({"rank_pattern": bomb}, {"alpha_pattern": {k: 8 for k in bomb}}):
            started = time.monotonic()
            body = assert_4xx(upload(env.base, "h3", key, zip_folder(env.adapter, config)))
            assert time.monotonic() - started < 2.0
            assert "pattern" in body["message"], body


def test_h4_huge_chat_body_does_not_stall_the_server(env: Env) -> None:
    """A 4 MB chat body (under the 4 MiB body cap): refused before tokenizing; /healthz answers in < 1 s
    throughout, and the neighbours' requests all succeed."""
    key = env.keys["tenant1"]
    messages = [{"role": "user", "content": "lorem ipsum dolor " * 1100} for _ in range(200)]
    body = json.dumps({"model": "personal", "messages": messages}).encode()
    assert 3_900_000 < len(body) < 4 * 1024 * 1024
    result: dict[str, Any] = {}

    def attack() -> None:
        started = time.monotonic()
        r = httpx.post(
            f"{env.base}/v1/chat/completions",
            content=body,
            headers={**auth(key), "Content-Type": "application/json"},
            timeout=60,
        )
        result.update(response=r, seconds=time.monotonic() - started)

    with neighbours(env):
        thread = threading.Thread(target=attack)
        thread.start()
        slowest = 0.0
        while thread.is_alive():
            started = time.monotonic()
            assert httpx.get(f"{env.base}/healthz", timeout=5).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.02)
        thread.join()
    assert_4xx(result["response"])
    assert slowest < 1.0, slowest
    assert result["seconds"] < 5.0, result["seconds"]


def test_h5_a_burst_of_stalled_preparations_holds_only_its_users_share(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 requests of one user whose preparation stalls holding a DB connection (as on their cold history
    index being built): at most OPPU_PREPARE_PER_USER_MAX (4) are prepared at once, the rest wait holding no
    connection, and the neighbours are served meanwhile (they waited for a pooled connection, then got 503
    `database_busy`, while the burst held the whole pool)."""
    key = new_user(env.base, "h5")
    h5 = storage_key(env, "h5")
    release = threading.Event()
    stalled, most_stalled = [0], [0]
    lock = threading.Lock()
    real_retrieve = history_service.retrieve

    def stalling_retrieve(session: Session, user: UserRef, *args: Any) -> list[Any]:
        found = real_retrieve(session, user, *args)
        if user.storage_key != h5:
            return found
        session.execute(select(1))  # holds a pooled connection from here, as a real build does
        with lock:
            stalled[0] += 1
            most_stalled[0] = max(most_stalled[0], stalled[0])
        try:
            assert release.wait(120)
        finally:
            with lock:
                stalled[0] -= 1
        return found

    monkeypatch.setattr(history_service, "retrieve", stalling_retrieve)
    statuses: list[int] = []

    def burst_request(i: int) -> None:
        body = {"prompt": f"burst {i}", "max_new_tokens": 2, "retrieval_k": 2}
        r = httpx.post(f"{env.base}/users/h5/generate", json=body, headers=auth(key), timeout=120)
        statuses.append(r.status_code)

    burst = [threading.Thread(target=burst_request, args=(i,)) for i in range(20)]
    for t in burst:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while stalled[0] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stalled[0] == 4, stalled
        with neighbours(env):
            time.sleep(0.5)
        assert most_stalled[0] == 4, most_stalled  # never more than the user's share of preparations
    finally:
        release.set()
        for t in burst:
            t.join(120)
    assert statuses == [200] * 20, statuses


def test_h6_a_flood_of_one_users_history_writes_runs_one_at_a_time(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """34 appends of one user at once, each holding a connection (and on SQLite the one write lock): one runs at
    a time (OPPU_HISTORY_WRITES_PER_USER_MAX 1), the next 31 wait holding neither, the 2 beyond the user's 32 at
    the gate get 429, and another user's append is served meanwhile. Measured before (16 clients sending
    1,000-item appends): the neighbours' appends took 1.1 s at the median and up to 8 s, against 0.03 s."""
    key, other = new_user(env.base, "h6"), new_user(env.base, "h6n")
    h6 = storage_key(env, "h6")
    release = threading.Event()
    inside, most_inside = [0], [0]
    lock = threading.Lock()
    real_append = history_service.append

    def stalling_append(session: Session, user: UserRef, *args: Any) -> Any:
        if user.storage_key != h6:
            return real_append(session, user, *args)
        session.execute(select(1))  # holds a pooled connection from here, as a large insert does
        with lock:
            inside[0] += 1
            most_inside[0] = max(most_inside[0], inside[0])
        try:
            assert release.wait(120)
            return real_append(session, user, *args)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(history_service, "append", stalling_append)
    statuses: list[int] = []

    def append(i: int) -> None:
        body = {"items": [{"id": f"flood-{i}", "output": "x"}]}
        r = httpx.post(f"{env.base}/users/h6/history", json=body, headers=auth(key), timeout=120)
        statuses.append(r.status_code)

    flood = [threading.Thread(target=append, args=(i,)) for i in range(34)]
    for t in flood:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while (len(statuses) < 2 or env.state.history_writes.at_gate(h6) < 32) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(statuses) == [429, 429] and env.state.history_writes.at_gate(h6) == 32, statuses
        started = time.monotonic()
        body = {"items": [{"id": "neighbour", "output": "y"}]}
        r = httpx.post(f"{env.base}/users/h6n/history", json=body, headers=auth(other), timeout=30)
        assert r.status_code == 201 and time.monotonic() - started < 5, r.text
        assert most_inside[0] == 1, most_inside
    finally:
        release.set()
        for t in flood:
            t.join(120)
    assert sorted(statuses) == [201] * 32 + [429] * 2, statuses
    assert most_inside[0] == 1, most_inside


def test_broken_uploads_and_missing_versions_under_load(env: Env) -> None:
    """vLLM's pattern: 25 uploads of broken adapters and 25 requests for versions whose files are gone, while
    8 good tenants generate: every good request succeeds; the attacker only ever gets 4xx/503 JSON."""
    key = new_user(env.base, "ghost")
    assert upload(env.base, "ghost", key, zip_folder(env.adapter)).status_code == 201
    version_dir = env.state.store.version_dir(storage_key(env, "ghost"), 1)
    assert (version_dir / WEIGHTS_NAME).is_file()
    shutil.rmtree(version_dir)  # as a prune on another replica, or a crash, leaves it
    weights = (env.adapter / WEIGHTS_NAME).read_bytes()
    broken = [
        b"not a zip",
        zip_folder(env.adapter, weights=weights[: len(weights) // 2]),
        zip_folder(env.adapter, {"r": 0}),
        zip_folder(env.adapter, {"target_modules": ["lm_head"]}),
        zip_folder(env.adapter, {"lora_alpha": 0}),
    ]
    attacker: Counter[int] = Counter()
    with neighbours(env):
        for i in range(25):
            attacker[assert_4xx(upload(env.base, "ghost", key, broken[i % len(broken)]))["code"] != ""] += 1
            body = {"prompt": "hello", "max_new_tokens": 3, "retrieval_k": 0}
            r = httpx.post(f"{env.base}/users/ghost/generate", json=body, headers=auth(key), timeout=60)
            assert r.status_code in (404, 503), (r.status_code, r.text[:200])
            assert set(r.json()) >= {"code", "message"}
    assert attacker[True] == 25


def storage_key(env: Env, user: str) -> str:
    with unit_of_work(env.state.session_factory) as session:
        found = session.scalar(select(User.storage_key).where(User.user_id == user))
    assert found is not None
    return found


def test_upload_concurrency_is_bounded_per_user_and_in_all(env: Env) -> None:
    """Uploads in flight (OPPU_UPLOAD_CONCURRENCY 2, _PER_USER 1): a second upload of the same user, or a third
    one in all once two are past their bodies, gets 429 with Retry-After at once; the slow ones still finish."""
    keys = {u: new_user(env.base, u) for u in ("up1", "up2", "up3")}
    body = zip_folder(env.adapter)
    release = threading.Event()
    done: dict[str, int] = {}

    def slow(user: str) -> None:
        def chunks() -> Iterator[bytes]:
            yield body[:100]
            release.wait(30)
            yield body[100:]

        headers = {**auth(keys[user]), "Content-Type": "application/zip"}
        r = httpx.put(f"{env.base}/users/{user}/adapter", content=chunks(), headers=headers, timeout=60)
        done[user] = r.status_code

    first, second = (threading.Thread(target=slow, args=(u,)) for u in ("up1", "up2"))
    first.start()
    try:
        time.sleep(0.5)  # the first upload holds its slot while its body trickles in
        same_user = upload(env.base, "up1", keys["up1"], body)
        assert same_user.status_code == 429 and same_user.headers["Retry-After"], same_user.text
        second.start()
        time.sleep(0.5)
        # Bodies still arriving hold no gate (issue 23 N7): a third user's upload goes through; once the gate's
        # 2 slots are taken (held here as two uploads being validated would), it gets 429 at once.
        assert upload(env.base, "up3", keys["up3"], body).status_code == 201
        held = [env.state.uploads.acquire(f"held{i}") for i in range(2)]
        try:
            third = upload(env.base, "up3", keys["up3"], body)
            assert third.status_code == 429 and "other uploads" in assert_4xx(third)["message"]
        finally:
            for give_back in held:
                give_back()
    finally:
        release.set()
        for t in (first, second):
            if t.is_alive():
                t.join(60)
    assert done == {"up1": 201, "up2": 201}, done
    assert upload(env.base, "up3", keys["up3"], body).status_code == 201  # the slots are free again
