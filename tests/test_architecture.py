"""The Owners table of docs/architecture.md as checks: who may import what, where SQL is built, which
repository functions are scoped by a tenant, how long functions get. Each check runs on the real tree and
on a planted violation, so it is shown to fail when the rule is broken."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service"


@dataclass(frozen=True)
class Contract:
    """Modules importing `package` (or a submodule) must be under one of `allowed` (paths relative to
    service/, a trailing "/" means a whole package)."""

    package: str
    allowed: tuple[str, ...]
    why: str


CONTRACTS = (
    Contract("rq", ("jobs/queue.py", "jobs/worker.py"), "only the queue owns the queue library"),
    Contract("redis", ("jobs/queue.py",), "pub/sub and the queue connection live in the queue"),
    Contract(
        "peft",
        ("training/trainer.py", "jobs/worker.py"),
        "PEFT trains (the worker pre-imports it for its forks); serving reads the format itself (peft_format)",
    ),
    Contract(
        "transformers",
        ("inference/", "training/trainer.py", "engine/", "jobs/worker.py"),
        "the model is loaded by the loader and run by the engine (training has its own copy)",
    ),
    Contract(
        "torch",
        (
            "engine/",
            "inference/",
            "training/",
            "adapters/slots.py",
            "adapters/cache.py",
            "adapters/peft_format.py",
            "adapters/validation.py",
            "jobs/context.py",
            "evaluation/runner.py",
        ),
        "weights are touched by the engine, the slots/cache and training only",
    ),
    Contract(
        "service.engine.builtin",
        ("composition.py", "engine/builtin/"),
        "nothing above the boundary knows which engine runs",
    ),
    Contract(
        "service.engine.vllm", ("composition.py", "engine/vllm/"), "nothing above the boundary knows which engine runs"
    ),
    Contract("vllm", ("engine/vllm/",), "vLLM is one engine behind the boundary"),
    Contract("rank_bm25", (), "BM25 is our own incremental index (retrieval/bm25.py); rank_bm25 is a test reference"),
    Contract("ctypes", ("inference/threads.py",), "the OpenMP runtime is reached in one place: the pool rule"),
)
# Names that build or run SQL: only repositories and db/ may import them.
SQL_NAMES = frozenset(
    {"select", "insert", "update", "delete", "func", "text", "true", "false", "and_", "or_", "exists", "literal"}
)
SQL_ALLOWED = ("db/",)
API_FORBIDDEN = ("torch", "sqlalchemy", "peft", "redis", "rq", "transformers", "safetensors")
# Repository functions must name whose rows they touch; these few are global on purpose (admin/maintenance).
SCOPE_PARAMS = frozenset({"user_pk", "owner_key", "user_id", "key_hash", "job_id", "owner"})
GLOBAL_QUERIES = {
    "accounts/repository.py": {
        "all_user_keys": "the shared task LoRA trains on every user (admin job)",
        "existing_storage_keys": "a shared job's contributors (storage keys it trained on), checked at publish",
    },
    "history/repository.py": {
        "count_plaintext": "`oppu keys status` / start-up: rows not yet sealed, all users",
        "seal_plaintext": "`oppu keys seal-existing` seals every user's plaintext rows, each under its owner's key",
    },
    "sealing/repository.py": {
        "kek_counts": "operator status and the start-up master-key check",
        "owner_count": "operator status",
        "shredded_count": "operator status",
        "one_per_kek": "start-up: one wrapped key per master key is opened",
        "not_under": "master-key rotation re-wraps every user's key",
        "rewrap": "the row carries its owner",
    },
    "adapters/repository.py": {
        "unsealed_versions": "`oppu keys seal-existing`: every owner's plaintext adapter files",
        "count_unsealed": "`oppu keys status` / start-up",
        "stale_current": "retrain-stale (admin) and /metrics count every user",
        "all_versions": "start-up reconciliation of the store with SQL (maintenance)",
        "add_contributors": "rows of one adapter version (its id)",
        "count_stale_current": "/metrics",
        "add": "the row carries its owner",
    },
    "jobs/repository.py": {
        "add_unless_active": "the job row carries its owner",
        "stale_running": "the reaper (worker) scans all jobs",
        "queued_before": "the reaper re-enqueues queued jobs whose message may be lost (all owners)",
        "delete_finished_before": "the reaper prunes finished jobs past OPPU_JOB_KEEP_S (all owners)",
        "unfinished": "embedded start-up recovery of this process's jobs",
        "count_by_status": "/metrics",
        "mean_durations": "/metrics",
    },
    "notices/repository.py": {
        "after": "every replica applies every owner's notices (the outbox poller)",
        "last_id": "where a starting replica's poller begins",
        "prune": "old notices of all owners go (maintenance)",
    },
}
MAX_FUNCTION_LINES = 50


def rel(path: Path) -> str:
    return path.relative_to(SERVICE).as_posix()


def service_modules() -> list[Path]:
    return sorted(SERVICE.rglob("*.py"))


def imports(tree: ast.AST) -> Iterable[tuple[str, list[str], int]]:
    """(module, imported names, line) for every import in a module, nested ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], node.lineno


def under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in prefixes)


def import_violations(path: str, source: str) -> list[str]:
    out: list[str] = []
    tree = ast.parse(source)
    for module, names, line in imports(tree):
        top = module.split(".")[0]
        for c in CONTRACTS:
            if (module == c.package or module.startswith(c.package + ".")) and not under(path, c.allowed):
                out.append(f"{path}:{line} imports {module} ({c.why})")
        if path.startswith("api/") and top in API_FORBIDDEN:
            out.append(f"{path}:{line} imports {module}: routes are thin (no {top} under api/)")
        is_repo = path.endswith("/repository.py") or under(path, SQL_ALLOWED)
        if top == "sqlalchemy" and not is_repo and (SQL_NAMES & set(names) or "dialects" in module):
            built = sorted(SQL_NAMES & set(names))
            out.append(f"{path}:{line} builds SQL ({module}: {built}); SQL lives in repositories")
    return out


def scope_violations(path: str, source: str) -> list[str]:
    if not path.endswith("/repository.py"):
        return []
    allowed = GLOBAL_QUERIES.get(path, {})
    out = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        params = [a.arg for a in node.args.args]
        if params[:1] != ["session"]:
            out.append(f"{path}:{node.lineno} {node.name}: a repository function takes the session first")
        elif not SCOPE_PARAMS & set(params[1:2]) and node.name not in allowed:
            scope = sorted(SCOPE_PARAMS)
            out.append(f"{path}:{node.lineno} {node.name}: second parameter must scope the rows ({scope})")
    return out


def length_violations(path: str, source: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out.append(f"{path}:{node.lineno} {node.name} is {n} lines (max {MAX_FUNCTION_LINES})")
    return out


def env_violations(path: str, source: str) -> list[str]:
    """Settings are the only reader of the environment (the vLLM engine may SET its own variables)."""
    if path == "config.py":
        return []
    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"):
            continue
        if node.attr in ("getenv", "environ") and not under(path, ("engine/vllm/",)):
            out.append(f"{path}:{node.lineno} reads os.{node.attr}; only config.py reads the environment")
    return out


def settings_copy_violations(path: str, source: str) -> list[str]:
    """Changed Settings are built by `Settings.with_overrides`, which validates; model_copy(update=...) does not."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "model_copy"
            and any(k.arg == "update" for k in node.keywords)
        ):
            out.append(f"{path}:{node.lineno} model_copy(update=...) skips validation; use Settings.with_overrides")
    return out


ENGINE_EFFECTS = frozenset({"prefetch", "use_shared", "drop_owner", "submit", "cancel"})


def pure_prepare_violations(path: str, source: str) -> list[str]:
    """The preparation step is pure (SQL and tokens in, a PreparedRequest out): engine effects happen once, in
    the engine, when the row is queued."""
    if path != "generation/prepare.py":
        return []
    return [
        f"{path}:{node.lineno} calls .{node.func.attr}(): preparing a request must not change engine state"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ENGINE_EFFECTS
    ]


PACKED_OWNER = "engine/builtin/packed.py"


def private_op_violations(path: str, source: str) -> list[str]:
    """torch's private oneDNN ops (packed weights) are reached in one place, the owner of the packed copies: a
    second user would hold weights that a merge does not re-pack."""
    if path == PACKED_OWNER:
        return []
    return [
        f"{path}:{n} uses torch.ops.mkldnn: only {PACKED_OWNER} may (it keeps packed weights equal to the model's)"
        for n, line in enumerate(source.splitlines(), 1)
        if "torch.ops.mkldnn" in line
    ]


THREADS_OWNER = "threads.py"
THREAD_CALLS = ("run_in_threadpool", "to_thread")
THREADS_ALLOWED = {"lifespan.py"}  # the start-up's composition, before any request


def thread_violations(path: str, source: str) -> list[str]:
    """Request work goes to worker threads only through service/threads.py: a plain `run_in_threadpool` (or
    asyncio's/anyio's to_thread) returns at once when the request is cancelled (its client left) while the
    thread runs on with the request's session, gate place or file."""
    if path == THREADS_OWNER or path in THREADS_ALLOWED:
        return []
    return [
        f"{path}:{n} calls a worker thread directly: use service.threads.run_to_its_end"
        for n, line in enumerate(source.splitlines(), 1)
        if any(call in line for call in THREAD_CALLS)
    ]


# The one SAVEPOINT left: PostgreSQL only (its transactions begin explicitly), so that a bulk retrain goes on past
# a user erased meanwhile.
SAVEPOINT_ALLOWED = {"jobs/repository.py"}


def savepoint_violations(path: str, source: str) -> list[str]:
    """An insert that may meet a taken key uses db/insert.insert_or_nothing, never a SAVEPOINT: on SQLite
    (pysqlite begins a transaction only before DML) a SAVEPOINT can be the transaction's first statement, and
    releasing it commits what it holds at once, outside the caller's unit of work."""
    if path in SAVEPOINT_ALLOWED:
        return []
    return [
        f"{path}:{n} opens a SAVEPOINT: use service.db.insert.insert_or_nothing"
        for n, line in enumerate(source.splitlines(), 1)
        if "begin_nested" in line
    ]


CHECKS = (
    savepoint_violations,
    thread_violations,
    private_op_violations,
    import_violations,
    scope_violations,
    length_violations,
    env_violations,
    settings_copy_violations,
    pure_prepare_violations,
)


def test_the_tree_keeps_every_contract() -> None:
    problems = [p for path in service_modules() for check in CHECKS for p in check(rel(path), path.read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("path", "source", "fragment"),
    [
        ("api/history.py", "import torch\n", "no torch under api/"),
        ("api/users.py", "from sqlalchemy.orm import Session\n", "no sqlalchemy under api/"),
        ("generation/service.py", "from rq import Queue\n", "queue library"),
        ("history/service.py", "from sqlalchemy import select\n", "SQL lives in repositories"),
        ("generation/prepare.py", "from service.engine.builtin.engine import BuiltinEngine\n", "which engine runs"),
        ("history/service.py", "import peft\n", "PEFT trains"),
        ("retrieval/bm25.py", "def f():\n    import torch\n", "weights are touched"),
        ("retrieval/bm25.py", "from rank_bm25 import BM25Okapi\n", "our own incremental index"),
    ],
)
def test_a_forbidden_import_is_caught(path: str, source: str, fragment: str) -> None:
    assert any(fragment in p for p in import_violations(path, source))


def test_a_direct_worker_thread_call_is_caught() -> None:
    assert thread_violations("api/adapters.py", "return await run_in_threadpool(service.upload, session)\n")
    assert thread_violations("engine/base.py", "row = await asyncio.to_thread(self._prepared_row, request)\n")
    assert not thread_violations(THREADS_OWNER, "work = run_in_threadpool(fn)\n")


def test_a_savepoint_outside_its_one_owner_is_caught() -> None:
    assert savepoint_violations("accounts/repository.py", "    with session.begin_nested():\n")
    assert not savepoint_violations("jobs/repository.py", "    with session.begin_nested():\n")


def test_every_route_endpoint_is_a_coroutine(tmp_path: Path) -> None:
    """FastAPI runs a plain `def` endpoint with its own threadpool call, which a cancelled request abandons;
    api/routing.WholeThreadRoute wraps each one in service.threads. A router without it is caught here."""
    import inspect

    from fastapi.routing import APIRoute

    from service.api.routing import WholeThreadRoute
    from service.config import Settings
    from service.main import create_app

    def api_routes(routes: Iterable[object]) -> Iterable[APIRoute]:
        for route in routes:
            if isinstance(route, APIRoute):
                yield route
            inner = getattr(route, "original_router", None)  # an included router
            if inner is not None:
                yield from api_routes(inner.routes)

    routes = list(api_routes(create_app(Settings(data_dir=tmp_path, admin_key="a" * 32)).routes))
    assert len(routes) > 20
    plain = [r.path for r in routes if not inspect.iscoroutinefunction(r.dependant.call)]
    assert not plain, f"endpoints FastAPI would run in an abandonable thread: {plain}"
    assert all(isinstance(r, WholeThreadRoute) for r in routes)


def test_an_unscoped_repository_function_is_caught() -> None:
    source = "def everything(session, limit):\n    ...\ndef mine(session, user_pk):\n    ...\n"
    (problem,) = scope_violations("history/repository.py", source)
    assert "everything" in problem


def test_a_private_onednn_op_outside_the_packed_weights_owner_is_caught() -> None:
    source = "y = torch.ops.mkldnn._linear_pointwise(x, w, None, 'none', [], '')\n"
    assert private_op_violations("engine/builtin/executor.py", source)
    assert not private_op_violations(PACKED_OWNER, source)


def test_a_long_function_and_an_env_read_are_caught() -> None:
    body = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert length_violations("x.py", body)
    assert env_violations("generation/prepare.py", "import os\nos.environ.get('X')\n")
    assert not env_violations("config.py", "import os\nos.environ.get('X')\n")


def test_an_unvalidated_settings_copy_and_an_engine_effect_in_prepare_are_caught() -> None:
    assert settings_copy_violations("composition.py", "s.model_copy(update={'admin_key': 'x'})\n")
    assert not settings_copy_violations("composition.py", "s.with_overrides(admin_key='x')\n")
    assert pure_prepare_violations("generation/prepare.py", "self.engine.use_shared(ctx.shared)\n")
    assert not pure_prepare_violations("generation/service.py", "engine.use_shared(x)\n")


# Job bodies and the RQ entry point get their context handed in (service.jobs.entry.install): the job package
# never reaches up into the composition root, the API state or the routes (issue 21: tasks -> composition ->
# tasks was a cycle).
JOBS_MAY_NOT_IMPORT = ("service.composition", "service.state", "service.api", "service.lifespan", "service.main")


def jobs_import_violations(path: str, source: str) -> list[str]:
    if not path.startswith("jobs/"):
        return []
    return [
        f"{path}:{line} imports {module}: nothing under service/jobs imports the composition root or the API"
        for module, _, line in imports(ast.parse(source))
        if any(module == m or module.startswith(m + ".") for m in JOBS_MAY_NOT_IMPORT)
    ]


def test_the_job_package_never_imports_the_composition_root() -> None:
    problems = [p for path in service_modules() for p in jobs_import_violations(rel(path), path.read_text())]
    assert not problems, "\n".join(problems)
    assert jobs_import_violations("jobs/tasks.py", "def f():\n    from service.composition import worker_job_context\n")
    assert jobs_import_violations("jobs/entry.py", "from service.state import AppState\n")
    assert not jobs_import_violations("api/jobs.py", "from service.composition import x\n")


# Downloads and exports are streamed from a temp file behind the download gate (issue 23 N5): under service/,
# only archive.py may build a whole zip in memory (pack_zip) and only the store reads a whole version
# (read_files); downloads use pack_zip_to and store.open_files.
WHOLE_IN_MEMORY = {"pack_zip": "adapters/archive.py", "read_files": "adapters/store.py"}


def whole_in_memory_violations(path: str, source: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if name in WHOLE_IN_MEMORY and path != WHOLE_IN_MEMORY[name]:
            out.append(f"{path}:{node.lineno} calls {name}(): downloads stream from disk (pack_zip_to, open_files)")
    return out


def test_downloads_never_hold_a_whole_adapter_in_memory() -> None:
    problems = [p for path in service_modules() for p in whole_in_memory_violations(rel(path), path.read_text())]
    assert not problems, "\n".join(problems)
    assert whole_in_memory_violations("adapters/service.py", "data = pack_zip(ctx.store.read_files(k, v))\n")
    assert whole_in_memory_violations("data_rights.py", "archive.pack_zip(files)\n")
    assert not whole_in_memory_violations("adapters/archive.py", "pack_zip(files)\n")


MAX_TYPE_IGNORES = 6  # in service/: each one names a library without types; new code types its way through


def test_type_ignores_stay_few_and_unused_ones_are_errors() -> None:
    ignores = [
        f"{rel(path)}:{n}"
        for path in service_modules()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "# type: ignore" in line
    ]
    assert len(ignores) <= MAX_TYPE_IGNORES, ignores
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True and config["warn_unused_ignores"] is True


# Test modules never import from each other (issue 21): a helper two modules share lives in tests/factories.py
# (fakes, adapters, archives, HTTP helpers) or tests/models.py (the models), a shared fixture in conftest.py.
TESTS = ROOT / "tests"
TEST_HELPERS = frozenset({"tests.conftest", "tests.factories", "tests.models"})


def cross_test_import_violations(path: str, source: str) -> list[str]:
    """`path` is relative to the repository root (tests/... or bench/...)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            out.append(f"{path}:{node.lineno} imports relatively; import shared helpers from {sorted(TEST_HELPERS)}")
            continue
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [a.name for a in node.names]  # `from tests import factories` names the module it imports
            modules = [f"{node.module}.{n}" for n in names] if node.module == "tests" else [node.module]
        else:
            continue
        for module in modules:
            if (module == "tests" or module.startswith("tests.")) and module not in TEST_HELPERS:
                out.append(
                    f"{path}:{node.lineno} imports {module}: test modules share helpers only through"
                    f" {sorted(TEST_HELPERS)}"
                )
    return out


def test_no_test_module_imports_another() -> None:
    modules = sorted([*TESTS.rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
    problems = [
        p for path in modules for p in cross_test_import_violations(path.relative_to(ROOT).as_posix(), path.read_text())
    ]
    assert not problems, "\n".join(problems)
    assert cross_test_import_violations("tests/api/test_x.py", "from tests.adapters.test_slots import make_adapter\n")
    assert cross_test_import_violations(
        "tests/api/test_x.py", "def f():\n    from tests.jobs.test_jobs_api import wait_job\n"
    )
    assert cross_test_import_violations("tests/api/test_x.py", "import tests.api.test_tenancy\n")
    assert cross_test_import_violations("tests/api/test_x.py", "from tests.reliability import random_lora_zip\n")
    assert cross_test_import_violations("tests/api/test_x.py", "from tests.api import test_tenancy\n")
    assert cross_test_import_violations("tests/api/test_x.py", "from .test_tenancy import PromptRecorder\n")
    allowed = "from tests.factories import FakeCodec\nfrom tests.models import tiny_model\nfrom tests import conftest\n"
    assert not cross_test_import_violations("tests/api/test_x.py", allowed)
