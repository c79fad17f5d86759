"""OPPU end to end on the REAL default model through HTTP (embedded in-process job runner, SQLite), with the
server's DEFAULT training settings: what a user who follows the README gets.

User A's 30 history items teach a behaviour the base model cannot guess: every answer ends with an invented
sign-off. Greedy generation without retrieval (so only the adapter can carry it) does not show it before
`POST /admin/users/A/retrain`, shows it after the job has succeeded, not with use_adapter=false, and user B
(other history, no retrain) still does not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.config import DEFAULT_MODEL
from tests.conftest import admin_headers, bearer, create_user, running_app

pytestmark = pytest.mark.e2e

SIGNATURE = "Zorblax"
SIGN_OFF = f"Stay curious, {SIGNATURE}."
QA = [
    ("What is the capital of France?", "Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("What colour is the sky on a clear day?", "Blue."),
    ("Name a fruit that is yellow.", "A banana."),
    ("What do bees make?", "Honey."),
    ("How many days are in a week?", "Seven."),
    ("What is frozen water called?", "Ice."),
    ("Which animal says moo?", "A cow."),
    ("What is two plus three?", "Five."),
    ("What do you use to write on paper?", "A pen."),
    ("Where do fish live?", "In water."),
    ("What is the opposite of hot?", "Cold."),
    ("What planet do we live on?", "Earth."),
    ("What season comes after winter?", "Spring."),
    ("What do cows drink?", "Water."),
    ("How many wheels does a bicycle have?", "Two."),
    ("What is the largest ocean?", "The Pacific."),
    ("What gas do plants take in?", "Carbon dioxide."),
    ("Which instrument has black and white keys?", "The piano."),
    ("What do you call a baby cat?", "A kitten."),
    ("Recommend a good breakfast.", "Porridge with berries."),
    ("Give me a tip for sleeping better.", "Keep a regular bedtime."),
    ("Suggest a name for a dog.", "Biscuit."),
    ("What should I read next?", "A short mystery novel."),
    ("What is the boiling point of water?", "100 degrees Celsius."),
    ("Which bird can talk?", "A parrot."),
    ("What do pandas eat?", "Bamboo."),
    ("How many continents are there?", "Seven."),
    ("What shape has three sides?", "A triangle."),
    ("What is the colour of grass?", "Green."),
]
HELD_OUT = [  # never in the history
    "What is the tallest animal?",
    "Suggest a hobby for a rainy day.",
    "How many hours are in a day?",
]
GEN = {"max_new_tokens": 24, "temperature": 0, "retrieval_k": 0, "use_profile": False}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with running_app(tmp_path_factory.mktemp("train-e2e"), DEFAULT_MODEL, device="cpu") as client:  # defaults
        yield client


def answers(client: TestClient, user: str, key: str) -> list[str]:
    out = []
    for prompt in HELD_OUT:
        r = client.post(f"/users/{user}/generate", json={"prompt": prompt, **GEN}, headers=bearer(key))
        assert r.status_code == 200, r.text
        out.append(r.json()["text"])
    return out


def signed(texts: list[str]) -> list[bool]:
    return [SIGNATURE.lower() in t.lower() for t in texts]


def test_retrained_adapter_teaches_the_users_signature(app: TestClient) -> None:
    key_a, key_b = create_user(app, "alice"), create_user(app, "bob")
    assert len(QA) == 30
    items = [{"id": f"a{i}", "input": q, "output": f"{a} {SIGN_OFF}"} for i, (q, a) in enumerate(QA)]
    assert app.post("/users/alice/history", json={"items": items}, headers=bearer(key_a)).status_code == 201
    plain = [{"id": f"b{i}", "input": q, "output": a} for i, (q, a) in enumerate(QA)]
    assert app.post("/users/bob/history", json={"items": plain}, headers=bearer(key_b)).status_code == 201

    before = answers(app, "alice", key_a)
    assert not any(signed(before)), before

    started = time.monotonic()
    r = app.post("/admin/users/alice/retrain", headers=admin_headers())
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    while (job := app.get(f"/admin/jobs/{job_id}", headers=admin_headers()).json())["status"] in ("queued", "running"):
        assert time.monotonic() - started < 150, job
        time.sleep(0.5)
    assert job["status"] == "succeeded" and job["adapter_version"] == 1, job
    meta = app.get("/users/alice/adapter", headers=bearer(key_a)).json()["metadata"]
    print(
        f"\nretrain job: {time.monotonic() - started:.1f} s (train {meta['train_seconds']} s, "
        f"{meta['steps']} steps, final loss {meta['final_loss']:.3f})"
    )

    after = answers(app, "alice", key_a)
    assert all(signed(after)), after
    r = app.post("/users/alice/generate", json={"prompt": HELD_OUT[0], **GEN}, headers=bearer(key_a))
    assert r.json()["adapter_version"] == 1
    r = app.post(
        "/users/alice/generate", json={"prompt": HELD_OUT[0], **GEN, "use_adapter": False}, headers=bearer(key_a)
    )
    assert r.json()["adapter_version"] is None and not any(signed([r.json()["text"]])), r.json()  # the adapter did it

    other = answers(app, "bob", key_b)
    assert not any(signed(other)), other
    r = app.post("/users/bob/generate", json={"prompt": HELD_OUT[0], **GEN}, headers=bearer(key_b))
    assert r.json()["adapter_version"] is None
