"""Schemathesis against the app's own OpenAPI schema (tiny model, SQLite): >= 5,000 generated requests over
every operation, positive and negative data, most with a valid key (the owner's, or the admin key on /admin
routes): 0 server errors and 0 responses that break the schema (body, content type, status, headers).

Deterministic: hypothesis is derandomized and runs without its example database. The training queue is a
stub (retrain answers 202 and the job stays queued): what runs a job is tested in tests/jobs."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeAlias

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.errors import InvalidSchema
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err, Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.jobs.queue import Listeners
from service.state import AppState
from tests.conftest import ADMIN_KEY, running_app
from tests.factories import random_lora_zip

OWNER, OTHER = "fuzz-owner", "fuzz-other"
POSITIVE_EXAMPLES = 150  # per operation (hypothesis stops earlier for operations with few distinct inputs)
NEGATIVE_EXAMPLES = 90
MIN_REQUESTS = 5_000
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    content_type_conformance,
    status_code_conformance,
    response_headers_conformance,
]
schemathesis.serializer.alias("application/zip", "application/octet-stream")  # adapter uploads: raw bytes
NEGATIVE_CHECKS = [*CHECKS, negative_data_rejection]  # data that breaks the schema must get a 4xx
# Who calls: mostly the owner (user routes) or the admin (admin routes), sometimes another tenant or nobody.
USER_AUTH = ["owner"] * 14 + ["admin"] * 3 + ["other", "none", "bad"]
ADMIN_AUTH = ["admin"] * 17 + ["owner", "none", "bad"]
# What OpenApiSchema.get_all_operations yields and as_strategy generates (schemathesis leaves the parameters open).
Operation: TypeAlias = APIOperation[Any, Any, Any, Any]
FuzzCase: TypeAlias = schemathesis.Case[Operation]


class NoopQueue:
    """Jobs are recorded in SQL as queued and never run (fuzzing must not start trainings)."""

    def enqueue(self, job_id: str, attempt: int) -> None:
        pass

    def depth(self) -> int:
        return 0

    def publish_adapter(self, owner_key: str, version: int | None) -> None:
        pass

    def publish_revoked(self, key_hashes: list[str]) -> None:
        pass

    def subscribe(self, listeners: Listeners, stop: threading.Event) -> None:
        pass

    def close(self) -> None:
        pass


class Fuzzer:
    """Sends generated cases through one TestClient, validates every response, keeps the owner usable."""

    def __init__(self, client: TestClient, state: AppState) -> None:
        self.client = client
        assert state.adapters is not None
        spec = state.adapters.spec
        self.adapter = random_lora_zip(spec.linear_shapes, spec.base_model_name, seed=1)
        self.base_model = spec.base_model_name
        self.owner_version = 0
        self.owner_job = ""
        self.keys: dict[str, str] = {}
        self.sent: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.failures: dict[tuple[str, int, str], str] = {}  # (operation, status, check title) -> first report
        self.failure_counts: Counter[tuple[str, int, str]] = Counter()
        self.no_negative: list[str] = []
        self.ok: Counter[str] = Counter()
        for user in (OWNER, OTHER):
            self.recreate(user)

    def _admin(self, method: str, url: str, **kw: Any) -> Any:
        return self.client.request(method, url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kw)

    def recreate(self, user: str) -> None:
        """(Re)create a user with a fresh key; the owner also gets an adapter, so adapter routes answer 200."""
        self._admin("DELETE", f"/admin/users/{user}")
        r = self._admin("POST", "/admin/users", json={"user_id": user})
        assert r.status_code == 201, r.text
        self.keys[user] = r.json()["api_key"]
        if user == OWNER:
            self.upload_adapter()
            self.owner_job = self.finished_job(user)

    def finished_job(self, user: str) -> str:
        """A job of the user's that has ended (retrain requested, then cancelled): their job route answers 200,
        and no active job blocks their other routes (a data-key rotation is 409 while one is queued)."""
        item = {"items": [{"id": "seed", "input": "q", "output": "a"}]}  # a retrain needs history (else 409)
        headers = {"Authorization": f"Bearer {self.keys[user]}"}
        r = self.client.post(f"/users/{user}/history", json=item, headers=headers)
        assert r.status_code in (200, 201), r.text
        r = self._admin("POST", f"/admin/users/{user}/retrain")
        assert r.status_code == 202, r.text
        job_id = str(r.json()["job_id"])
        r = self._admin("POST", f"/admin/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        return job_id

    def upload_adapter(self) -> None:
        headers = {"Authorization": f"Bearer {self.keys[OWNER]}", "Content-Type": "application/zip"}
        r = self.client.put(f"/users/{OWNER}/adapter", content=self.adapter, headers=headers)
        assert r.status_code == 201, r.text
        self.owner_version = int(r.json()["version"])

    def token(self, auth: str) -> str | None:
        return {
            "owner": self.keys[OWNER],
            "other": self.keys[OTHER],
            "admin": ADMIN_KEY,
            "bad": "oppu_not-a-real-key",
            "none": None,
        }[auth]

    def send(self, case: FuzzCase, auth: str) -> None:
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        headers = {k: str(v) for k, v in (kwargs.get("headers") or {}).items()}
        token = self.token(auth)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        body: dict[str, Any] = {}
        if "json" in kwargs:
            body["json"] = kwargs["json"]
        elif kwargs.get("data") is not None:
            data = kwargs["data"]
            body["content"] = data if isinstance(data, bytes) else str(data).encode()
        response = self.client.request(
            kwargs["method"], kwargs["url"], params=kwargs.get("params"), headers=headers, **body
        )
        label = f"{case.method.upper()} {case.operation.path}"
        self.sent[label] += 1
        self.statuses[response.status_code] += 1
        self.ok[label] += response.status_code < 300
        negative = case.meta is not None and case.meta.generation.mode is GenerationMode.NEGATIVE
        try:
            case.validate_response(response, checks=NEGATIVE_CHECKS if negative else CHECKS, headers=headers)
        except FailureGroup as exc:
            for failure in exc.exceptions:
                key = (label, response.status_code, getattr(failure, "title", type(failure).__name__))
                self.failure_counts[key] += 1
                self.failures.setdefault(key, f"[{auth}] {str(exc)[:1200]}")
        self.restore(case, response)

    def restore(self, case: FuzzCase, response: Any) -> None:
        """Undo what a fuzzed call did to the fixtures' users (erased, keys rotated or revoked)."""
        path, status = case.operation.path, response.status_code
        user = (case.path_parameters or {}).get("user_id")
        if user not in self.keys or status >= 300:
            return
        if path.endswith("/keys/rotate"):
            self.keys[user] = response.json()["api_key"]
        elif path.endswith(("/retrain", "/keys/rotate-data-key")):
            # The stub queue never runs it: cancelled, so the user's other job kind is not 409 job_active for the
            # rest of the run (a retrain and a data-key rotation never answer for each other).
            self._admin("POST", f"/admin/jobs/{response.json()['job_id']}/cancel")
        elif path in ("/users/{user_id}", "/admin/users/{user_id}") or path.endswith("/keys/revoke"):
            self.recreate(user)
        elif path == "/users/{user_id}/adapter" and user == OWNER:
            if case.method.upper() == "DELETE":
                self.upload_adapter()
            elif case.method.upper() == "PUT":
                self.owner_version = int(response.json()["version"])


def often(strategy: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`strategy` three times in four, else `other` (hypothesis' one_of does not weight its branches)."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda pick: strategy if pick else other)


def nudged(strategy: st.SearchStrategy[Any], field: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly set one body field to a value the server knows (a real model name, a kept version)."""

    def apply(args: tuple[FuzzCase, bool, Any]) -> FuzzCase:
        case, nudge, value = args
        if nudge and isinstance(case.body, dict):
            case.body[field] = value
        return case

    return st.tuples(strategy, st.sampled_from([True, True, True, False]), values).map(apply)


def strategy_for(operation: Operation, mode: GenerationMode, fuzzer: Fuzzer, job_id: str) -> st.SearchStrategy[Any]:
    """Positive cases mostly name the owner (or a real job) to get past authorisation into the route's own
    code; a few fields are nudged to values the server knows; uploads are sometimes a valid adapter."""
    free = operation.as_strategy(generation_mode=mode)
    label = f"{operation.method.upper()} {operation.path}"
    names = {p.name for p in operation.path_parameters}
    fixed = {"user_id": OWNER} if "user_id" in names else {}
    if "job_id" in names:  # the owner's own job on their route, the shared job on the admin's
        fixed["job_id"] = fuzzer.owner_job if "user_id" in names else job_id
    if mode is GenerationMode.NEGATIVE:
        return free
    owned = operation.as_strategy(generation_mode=mode, path_parameters=fixed) if fixed else free
    if label == "PUT /users/{user_id}/adapter":
        valid = operation.as_strategy(path_parameters=fixed, body=fuzzer.adapter, media_type="application/zip")
        owned = st.one_of(owned, valid)
    elif label.startswith("POST /v1/"):
        models = st.sampled_from(["personal", fuzzer.base_model, f"user:{OWNER}"])
        owned = nudged(owned, "model", models)
    elif label == "POST /admin/users/{user_id}/adapter/rollback":
        owned = nudged(owned, "version", st.builds(lambda: fuzzer.owner_version))
    return often(owned, free) if fixed else owned


def operation_of(result: Ok[Operation] | Err[InvalidSchema]) -> Operation:
    if isinstance(result, Err):
        raise result.err()  # the app's own schema must load whole
    return result.ok()


def run_operation(fuzzer: Fuzzer, operation: Operation, mode: GenerationMode, job_id: str) -> None:
    auth = ADMIN_AUTH if operation.path.startswith("/admin") else USER_AUTH
    examples = POSITIVE_EXAMPLES if mode is GenerationMode.POSITIVE else NEGATIVE_EXAMPLES

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy_for(operation, mode, fuzzer, job_id), who=st.sampled_from(auth))
    def fuzz(case: FuzzCase, who: str) -> None:
        fuzzer.send(case, who)

    try:
        fuzz()
    except Unsatisfiable:  # nothing to negate: no parameters and no body (e.g. GET /healthz)
        assert mode is GenerationMode.NEGATIVE, operation.path
        fuzzer.no_negative.append(f"{operation.method.upper()} {operation.path}")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    with running_app(tmp, tiny_model_path, max_new_tokens_cap=8, default_max_new_tokens=4) as client:
        state: AppState = client.app.state.oppu  # type: ignore[attr-defined]
        real_queue, state.queue = state.queue, NoopQueue()
        try:
            yield client
        finally:
            state.queue = real_queue


def test_schemathesis_5000_requests_no_server_errors_no_schema_violations(app: TestClient) -> None:
    started = time.monotonic()
    state: AppState = app.app.state.oppu  # type: ignore[attr-defined]
    schema = schemathesis.openapi.from_dict(app.get("/openapi.json").json())
    fuzzer = Fuzzer(app, state)
    r = app.post("/admin/shared-adapter/retrain", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    operations = [operation_of(result) for result in schema.get_all_operations()]
    assert len(operations) >= 25
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for operation in operations:
            run_operation(fuzzer, operation, mode, job_id)
    total = sum(fuzzer.sent.values())
    summary = {
        "requests": total,
        "seconds": round(time.monotonic() - started, 1),
        "statuses": dict(sorted(fuzzer.statuses.items())),
        "per_operation": {label: [n, fuzzer.ok[label]] for label, n in sorted(fuzzer.sent.items())},  # [sent, 2xx]
        "no_negative_cases": fuzzer.no_negative,
    }
    print(json.dumps(summary, indent=1))
    report = [f"{n} x {key}: {fuzzer.failures[key]}" for key, n in fuzzer.failure_counts.most_common()]
    assert not report, f"{len(report)} distinct failures:\n" + "\n\n".join(report[:25])
    assert not [s for s in fuzzer.statuses if s >= 500], summary
    assert total >= MIN_REQUESTS, summary
    assert set(fuzzer.sent) == {f"{o.method.upper()} {o.path}" for o in operations}, "an operation was never called"
    assert all(fuzzer.ok[label] > 0 for label in fuzzer.sent), f"an operation never succeeded: {summary}"
