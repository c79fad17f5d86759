"""The personalization experiment on MovieLens: every method scored on the same test items.

Drives the real components: users and histories in SQL (history service, migrated SQLite in a temp
dir), BM25 retrieval through the history service, the ONE prompt builder, OPPU training (stage 1: a
shared task LoRA on the evaluated users' histories, or on users outside them (shared_pool); stage 2: one
LoRA per user on top of it, prompts retrieved from EARLIER items only), adapters published to the store
and served through AdapterCache + LoraSlots. Stage 2 and the methods run one user at a time, and each
finished user (like the profiles and stage 1) is written to the run folder at once, so an interrupted run
resumes where it stopped. The methods, presets and leakage checks are `protocol`'s, the statistics
`analysis`'s, the baselines `baselines`'s; no HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from service import composition
from service import users as user_accounts
from service.adapters import service as adapter_service
from service.config import Settings
from service.db.migrate import upgrade
from service.db.models import SHARED_OWNER
from service.db.session import unit_of_work
from service.engine.base import collect
from service.evaluation import analysis, baselines, metrics, protocol, report, reread, stats
from service.evaluation import movielens as ml
from service.evaluation.protocol import (
    EV,
    MEDIAN,
    SCOPE,
    EvalConfig,
    LlmMethod,
    check_example_leakage,
    check_history_leakage,
    check_retrieved_leakage,
    default_data_dir,
)
from service.generation.prepare import ChatTurn, GenerationSpec, Personalization, PreparedRequest
from service.generation.sampling import SamplingOptions
from service.history import repository as history_repo
from service.history import service as history
from service.history.schemas import HistoryAppendIn, HistoryItemIn
from service.jobs.queue import NoQueue
from service.jobs.tasks import JobContext
from service.prompts import build_profile_prompt
from service.tenancy import UserRef
from service.training.examples import TrainExample, build_shared_examples, build_user_examples
from service.training.trainer import LoraTrainConfig, TrainOutput, train_lora

# --- the serving side: the server's own core (SQL, store, engine, preparation step) ---


@dataclass
class _Bench:
    config: EvalConfig
    core: composition.Core
    jobs: JobContext  # the training model (the served one carries slot layers), with the shared LoRA merged
    users: dict[str, UserRef]

    @property
    def settings(self) -> Settings:
        return self.core.settings


def _settings(base: Settings, workdir: Path, config: EvalConfig, extra_users: int = 0) -> Settings:
    user_targets = LoraTrainConfig.from_settings(base, stage="user").target_modules
    shared_targets = LoraTrainConfig.from_settings(base, stage="shared").target_modules
    return base.with_overrides(
        **{
            "data_dir": workdir,
            "database_url": f"sqlite:///{workdir / 'eval.sqlite3'}",
            "adapters_dir": workdir / "adapters",
            "model": config.model or base.model,
            "model_cache_dir": base.resolved_model_cache_dir.resolve(),
            "adapter_slots": config.gen_batch,
            "batch_max_size": config.gen_batch,
            # Slots sized for what is trained (all 7 projections at rank 64 would be ~1.3 GB here).
            "adapter_max_rank": config.rank or base.train_user_rank,
            "adapter_target_modules": tuple(dict.fromkeys((*user_targets, *shared_targets))),
            "bm25_cache_users": max(base.bm25_cache_users, config.users + extra_users),
            # Every test request is queued at once: no fair-share cap, no deadline inside one run.
            "queue_max": 1_000_000,
            "queue_per_user_max": 1_000_000,
            "request_timeout_s": 7 * 24 * 3600.0,
            "max_new_tokens_cap": max(base.max_new_tokens_cap, config.profile_new_tokens, config.max_new_tokens),
        }
    )


def _open_bench(config: EvalConfig, settings: Settings) -> _Bench:
    upgrade(settings.resolved_database_url)
    core = composition.core(settings)
    jobs = composition.job_context(settings, NoQueue(), core.db, core.store)
    core.engine.start()
    return _Bench(config, core, jobs, {})


def _store_histories(bench: _Bench, splits: Sequence[ml.UserSplit]) -> dict[str, list[history.DocSnapshot]]:
    with unit_of_work(bench.core.db.session_factory) as session:
        for split in splits:
            ref, _key = user_accounts.create_user(session, split.user_id)
            items = [HistoryItemIn(**ml.history_item(h)) for h in split.history]
            history.append(session, ref, HistoryAppendIn(items=items))
            bench.users[split.user_id] = ref
    with unit_of_work(bench.core.db.session_factory) as session:  # read back: training sees what SQL holds
        return {
            uid: [history.snapshot(i) for i in history_repo.all_items(session, ref)] for uid, ref in bench.users.items()
        }


def _generate(
    bench: _Bench,
    specs: Sequence[GenerationSpec],
    desc: str,
    on_done: Callable[[int, str], None] | None = None,
) -> tuple[list[str], list[PreparedRequest]]:
    """Answers in request order. Every request goes through the server's own preparation step and engine,
    all queued at once: the engine batches them across users (adapters disk -> host -> slot as served).
    `on_done(i, text)` hears each answer as it finishes (a resumable stage keeps it at once)."""
    preparer = bench.core.preparer
    prepared = [preparer.prepare(spec) for spec in specs]
    bar = tqdm(total=len(prepared), desc=desc, unit="req", disable=not bench.config.progress)

    async def one(i: int, p: PreparedRequest) -> str:
        done = await collect(preparer.engine, p.request)
        bar.update(1)
        text = preparer.codec.decode(done.token_ids).strip()
        if on_done is not None:
            on_done(i, text)
        return text

    async def run_all() -> list[str]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prepared))))

    try:
        return asyncio.run(run_all()), prepared
    finally:
        bar.close()


def _spec(bench: _Bench, user: UserRef, text: str, method: LlmMethod, max_new: int) -> GenerationSpec:
    return GenerationSpec(
        user=user,
        prompt=(ChatTurn("user", text),),
        personalization=Personalization(method.k, method.profile, method.adapter),
        sampling=SamplingOptions(max_new_tokens=max_new, temperature=0.0, seed=bench.config.seed),
    )


def _generate_profiles(
    bench: _Bench, docs: Mapping[str, Sequence[history.DocSnapshot]], state: RunState
) -> dict[str, str]:
    """PAG: the BASE model (no shared LoRA yet) writes a profile from each user's recent history. Each profile
    is kept in the run folder as it finishes (profiles.partial.json), so an interrupted stage resumes with the
    missing ones only; with one row per engine step (the resumable presets) a profile does not depend on which
    others were generated with it."""
    n = bench.config.profile_items
    uids = [u for u in bench.users if docs[u]]
    kept: dict[str, str] = dict(state.load(PARTIAL_PROFILES) or {})
    todo = [u for u in uids if u not in kept]
    base = LlmMethod("profile", 0, False, False)
    max_new = bench.config.profile_new_tokens
    specs = [_spec(bench, bench.users[u], build_profile_prompt(list(docs[u])[-n:]), base, max_new) for u in todo]

    def keep(i: int, text: str) -> None:
        kept[todo[i]] = text
        state.save(PARTIAL_PROFILES, kept)

    if specs:
        _generate(bench, specs, "profiles", keep)
    return {u: kept[u] for u in uids}


def _apply_profiles(bench: _Bench, texts: Mapping[str, str]) -> dict[str, str | None]:
    with unit_of_work(bench.core.db.session_factory) as session:
        for uid, text in texts.items():
            if text:
                history.set_profile(session, bench.users[uid], text, source="generated")
        return {uid: history.profile_text(session, ref) for uid, ref in bench.users.items()}


def _train_config(config: EvalConfig, settings: Settings, *, shared: bool) -> LoraTrainConfig:
    """The server's training config for the stage (OPPU_TRAIN_*), with the run's explicit overrides."""
    base = LoraTrainConfig.from_settings(settings, stage="shared" if shared else "user")
    overrides: dict[str, Any] = {
        "rank": config.rank,
        "alpha": config.alpha,
        "lr": config.shared_lr if shared else config.user_lr,
        "epochs": config.shared_epochs if shared else config.user_epochs,
        "batch_size": config.shared_batch_size if shared else config.user_batch_size,
        "min_steps": None if shared else config.user_min_steps,
    }
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **chosen, max_seq_len=config.max_seq_len, seed=config.seed)


def _shared_examples(
    bench: _Bench, docs: Mapping[str, Sequence[history.DocSnapshot]], profiles: Mapping[str, str | None]
) -> list[TrainExample]:
    """Stage 1 sees every prompt shape the baselines use (k in shared_ks, and the profile), each on a
    seeded share of every user's history, so that no baseline is off the task LoRA's training format."""
    s, c = bench.settings, bench.config
    variants: list[tuple[int, Mapping[str, str | None] | None]] = [(k, None) for k in c.shared_ks]
    variants.append((0, profiles))
    per_user = max(1, min(c.shared_max_per_user, math.ceil(c.history_items / len(variants))))
    scoped = {u: [replace(d, id=f"{u}{SCOPE}{d.id}") for d in ds] for u, ds in docs.items() if ds}
    out: list[TrainExample] = []
    for i, (k, profs) in enumerate(variants):
        out += build_shared_examples(
            scoped,
            k=k,
            max_per_user=per_user,
            seed=c.seed + i,
            profiles=profs,
            item_chars=s.retrieval_item_chars,
            profile_chars=s.profile_max_chars,
        )
    return out


def _train_shared(bench: _Bench, examples: Sequence[TrainExample]) -> TrainOutput:
    """Stage 1 on the plain base; the next request the preparation step makes notices the new shared
    version, and the engine merges it into the served base before that request runs."""
    lm = bench.core.loaded
    config = _train_config(bench.config, bench.settings, shared=True)
    steps = config.epochs_for(len(examples)) * math.ceil(len(examples) / config.batch_size)
    with tqdm(total=steps, desc="shared LoRA", unit="step", disable=not bench.config.progress) as bar:
        return train_lora(
            bench.jobs.training_model(None),
            lm.tokenizer,
            examples,
            config,
            base_model_name=lm.name,
            progress=lambda done: bar.update(round(done * steps) - bar.n),
        )


def _summary(out: TrainOutput) -> dict[str, Any]:
    """What the report keeps of a training run (the run folder keeps it too, so a resume needs no retrain)."""
    return {
        "examples": out.examples,
        "steps": out.steps,
        "final_loss": out.final_loss,
        "epoch_losses": list(out.epoch_losses),
        "seconds": round(out.seconds, 2),
        "compute_dtype": out.compute_dtype,
    }


def _user_examples(
    bench: _Bench, docs: Sequence[history.DocSnapshot], profile: str | None
) -> tuple[list[TrainExample], int]:
    s, c = bench.settings, bench.config
    k = c.user_train_k if c.user_train_k is not None else s.train_retrieval_k
    examples = build_user_examples(
        docs,
        k=k,
        profile=profile if c.user_train_profile else None,
        item_chars=s.retrieval_item_chars,
        profile_chars=s.profile_max_chars,
    )
    return examples, k


def _user_answers(bench: _Bench, task: ml.RatingTask, split: ml.UserSplit) -> tuple[list[dict[str, Any]], int]:
    """Every method's answers for one user's scored items: the greedy text, and the distribution over the
    rating candidates (one prefill-only scoring row per item and method), all queued at once."""
    preparer, c = bench.core.preparer, bench.config
    ref = bench.users[split.user_id]
    methods = c.methods()
    greedy = [_spec(bench, ref, ml.item_input(i), m, c.max_new_tokens) for m in methods for i in split.test]
    scoring = [
        replace(_spec(bench, ref, ml.item_input(i), m, 1), candidates=protocol.RATINGS)
        for m in methods
        for i in split.test
    ]
    prepared = [preparer.prepare(spec) for spec in [*greedy, *scoring]]
    tests = protocol.test_ids(task)
    for p, spec in zip(prepared, [*greedy, *scoring], strict=True):
        check_retrieved_leakage(split.user_id, tests, (r.id for r in p.retrieved))
        if spec.personalization.use_adapter and p.adapter_version is None:
            raise RuntimeError(f"{split.user_id} has no adapter")

    async def one(p: PreparedRequest) -> Any:
        return await collect(preparer.engine, p.request)

    async def run_all() -> list[Any]:
        return list(await asyncio.gather(*(one(p) for p in prepared)))

    done = asyncio.run(run_all())
    n, values = len(split.test), [float(r) for r in protocol.RATINGS]
    rows: list[dict[str, Any]] = []
    for j, item in enumerate(split.test):
        pred: dict[str, float | None] = {}
        raw: dict[str, str] = {}
        dist: dict[str, list[float]] = {}
        for mi, m in enumerate(methods):
            g = done[mi * n + j]
            sc = done[len(greedy) + mi * n + j]
            raw[m.name] = preparer.codec.decode(g.token_ids).strip()
            probs = stats.normalise([sum(lps) for lps in sc.finished.continuation_logprobs])
            pred[m.name] = metrics.parse_rating(raw[m.name])
            pred[m.name + EV] = stats.expected_value(values, probs)
            pred[m.name + MEDIAN] = stats.median_value(values, probs)
            dist[m.name] = [round(p, 6) for p in probs]
        rows.append(
            {"user": split.user_id, "item": item.item_id, "gold": item.rating, "pred": pred, "raw": raw, "dist": dist}
        )
    return rows, sum(len(p.retrieved) for p in prepared)


def machine_info(dtype: str) -> dict[str, Any]:
    """The machine a timing was measured on: CPU model and the flags that decide CPU speed (bf16 paths)."""
    model, flags = "unknown", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cpu_flags": {f: f in flags for f in wanted},
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "dtype": dtype,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def _config_report(config: EvalConfig, bench: _Bench, task: ml.RatingTask, data_dir: Path) -> dict[str, Any]:
    lm = bench.core.loaded
    default_k = bench.settings.train_retrieval_k
    return {
        **{k: v for k, v in asdict(config).items() if k != "progress"},
        "users": len(task.users),
        "items": sum(len(s.test) for s in task.users),
        "seeds": {"data": config.seed, "train": config.seed, "bootstrap": config.seed},
        "model": lm.name,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": machine_info(str(lm.dtype).removeprefix("torch.")),
        "data_dir": str(data_dir),
        "split": (
            "temporal: test = each user's last ratings, history = the ratings just before"
            if config.split == "test"
            else "temporal DEV: each user's last test_items ratings dropped unread; scored = the ones just before"
        ),
        "holdout": config.holdout,
        "request": "the test movie's title | genres (movielens.item_input), as in training; also the retrieval query"
        + (" | other users' count and mean before it (item context)" if config.item_context else ""),
        "decoding": "greedy (method), and from the distribution over the ratings 0.5..5.0 scored as the answer: "
        "its expected value (method_ev) and median (method_median); the distribution is saved per item (dist)",
        "training": {
            "shared": asdict(_train_config(config, bench.settings, shared=True)),
            "user": asdict(_train_config(config, bench.settings, shared=False)),
        },
        "shared_pool": config.shared_pool,
        "oppu_rag_k": config.oppu_rag_k,
        "user_lora_train_k": config.user_train_k if config.user_train_k is not None else default_k,
        "user_lora_train_profile": config.user_train_profile,
        "served_with_training_shape": {m.name: config.trained_shape(m, default_k) for m in config.methods()},
        "tuned_on_test_items": False,
        "methods": {m.name: asdict(m) for m in config.methods()},
    }


def run_eval(
    config: EvalConfig,
    *,
    data_dir: Path | str | None = None,
    settings: Settings | None = None,
    run_dir: Path | str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Runs the whole experiment and returns the report (JSON-ready). With `run_dir`, every finished stage
    and every finished user is written there as it finishes, and `resume=True` continues an interrupted run
    from it (the report is the same as an uninterrupted run's, wall times aside). A run that finishes
    removes what it wrote there."""
    started = time.perf_counter()
    timing: dict[str, Any] = {}
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    data = ml.load_movielens(root)
    task, dev_task, outside = protocol.build_tasks(data, config)
    dev_report = _read_dev_report(config, dev_task) if config.split == "test" and config.dev_report else None
    timing["data_s"] = round(time.perf_counter() - started, 2)
    with tempfile.TemporaryDirectory(prefix="oppu-eval-") as tmp:
        state = RunState.open(Path(run_dir) if run_dir is not None else Path(tmp) / "run", config, root, resume)
        bench = _open_bench(config, _settings(settings or Settings(), Path(tmp), config, len(outside)))
        try:
            state.pin_dtype(str(bench.core.loaded.dtype).removeprefix("torch."))
            report = _run(bench, data, task, dev_task, outside, root, timing, started, state, dev_report)
            state.clear()  # a finished run leaves only its report (the folder holds adapter files)
            return report
        finally:
            bench.core.engine.stop()
            bench.core.db.dispose()


def _read_dev_report(config: EvalConfig, dev_task: ml.RatingTask) -> dict[str, Any]:
    assert config.dev_report is not None
    dev = json.loads(Path(config.dev_report).read_text(encoding="utf-8"))
    protocol.check_dev_report(dev, dev_task, name=config.dev_report)
    return dict(dev)


def code_version() -> dict[str, Any]:
    """The commit this checkout is at and the git tree of its service/ (what decides the numbers; None outside
    a git checkout), and whether service/ has uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    git = shutil.which("git")

    def ask(*args: str) -> str | None:
        if git is None:
            return None
        done = subprocess.run([git, "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    return {
        "commit": ask("rev-parse", "HEAD"),
        "service_tree": ask("rev-parse", "HEAD:service"),
        "service_modified": bool(ask("status", "--porcelain", "--", "service")),
    }


def _code_changed(code: Sequence[Mapping[str, Any]], sessions: int) -> bool | None:
    """True: service/ differed between sessions; None: unknown (a session not recorded, or uncommitted changes)."""
    if len({c["service_tree"] for c in code}) > 1:
        return True
    if len(code) < sessions or any(c["service_modified"] or c["service_tree"] is None for c in code):
        return None
    return False


PARTIAL_PROFILES = "profiles.partial.json"  # the profiles written so far by an unfinished profile stage


class RunState:
    """The run folder: run.json (what the run is, so a resume cannot mix two configurations), profiles.json,
    shared/ (stage-1 files and summary), users/NNNN.json (one per finished user, named by position, never by
    user id). Files are written whole (temp file + rename), so an interrupted write leaves no half file."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, root: Path, config: EvalConfig, data_dir: Path, resume: bool) -> RunState:
        ident = {k: v for k, v in asdict(config).items() if k != "progress"}
        fingerprint = hashlib.sha256(json.dumps([ident, str(data_dir)], sort_keys=True).encode()).hexdigest()
        path = root / "run.json"
        if path.exists():
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if not resume:
                raise ValueError(f"{root} holds an earlier run: pass --resume to continue it, or remove it")
            if manifest.get("fingerprint") != fingerprint:
                raise ValueError(f"{root} holds a run of another configuration; it cannot be resumed with this one")
            manifest["sessions"] = int(manifest.get("sessions", 1)) + 1
            manifest.setdefault("code", [])
        else:
            root.mkdir(parents=True, exist_ok=True)
            manifest = {"fingerprint": fingerprint, "config": ident, "sessions": 1, "wall_s_before": 0.0, "code": []}
        # A long run spans sessions: each records the code it ran, so a report says if the code that made its
        # numbers changed between them (the config's fingerprint cannot see an engine or trainer change).
        manifest["code"].append(code_version())
        state = cls(root, manifest)
        state.save("run.json", manifest)
        return state

    def pin_dtype(self, dtype: str) -> None:
        """A run is made in one dtype: resumed on a machine whose default is another (sessions run on different
        CPUs; OPPU_DTYPE=auto follows the CPU), it stops here instead of mixing profiles and stage 1 made in one
        dtype with users scored in the other."""
        made_in = self.manifest.get("dtype")
        if made_in is not None and made_in != dtype:
            raise ValueError(
                f"{self.root} was run in {made_in}; this machine would continue it in {dtype}. Set "
                f"OPPU_DTYPE={made_in} to continue it (bfloat16 wants a CPU with native bf16: AMX or AVX512-BF16), "
                "or start a new run"
            )
        if made_in is None:
            self.manifest["dtype"] = dtype
            self.save("run.json", self.manifest)

    def clear(self) -> None:
        """Remove what this class wrote (never anything else a user's folder may hold)."""
        for folder in ("users", "shared/files", "shared"):
            path = self.root / folder
            if path.is_dir():
                for f in path.iterdir():
                    if f.is_file() and (f.suffix in (".json", ".tmp") or folder == "shared/files"):
                        f.unlink()
        for name in ("profiles.json", PARTIAL_PROFILES, "run.json"):
            (self.root / name).unlink(missing_ok=True)
        for folder in ("shared/files", "shared", "users", ""):
            path = self.root / folder
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()

    def save(self, name: str, data: Any) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    def load(self, name: str) -> Any | None:
        path = self.root / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def save_files(self, folder: str, files: Mapping[str, bytes]) -> None:
        out = self.root / folder
        out.mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            if Path(name).name != name or name.startswith("."):
                raise ValueError(f"unexpected adapter file name {name!r}")
            (out / (name + ".tmp")).write_bytes(blob)
            os.replace(out / (name + ".tmp"), out / name)

    def load_files(self, folder: str) -> dict[str, bytes]:
        out = self.root / folder
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.endswith(".tmp")}


def _timed(timing: dict[str, Any], name: str, since: float) -> float:
    now = time.perf_counter()
    timing[name] = round(now - since, 2)
    return now


def _run(
    bench: _Bench,
    data: ml.MovieLens,
    task: ml.RatingTask,
    dev_task: ml.RatingTask,
    outside: Sequence[ml.UserSplit],
    root: Path,
    timing: dict[str, Any],
    started: float,
    state: RunState,
    dev_report: Mapping[str, Any] | None,
) -> dict[str, Any]:
    _timed(timing, "setup_s", started)
    docs = _store_histories(bench, [*task.users, *outside])
    evaluated = [s.user_id for s in task.users]
    leak: dict[str, Any] = {"history_items": check_history_leakage(task, {u: docs[u] for u in evaluated})}
    if bench.config.item_context:
        leak["item_context"] = ml.check_context_leakage(task, data) + ml.check_context_leakage(
            ml.RatingTask(list(outside)), data
        )
    profiles = _profiles_stage(bench, docs, timing, state)
    shared_summary, shared_version = _shared_stage(bench, task, outside, docs, profiles, leak, timing, state)
    # Stage 2 and every method, one user at a time; each finished user is written at once.
    results = _users(bench, task, docs, profiles, shared_version, state)
    timing["user_train_s"] = round(sum(r["timing"]["train_s"] for r in results), 2)
    timing["methods_s"] = round(sum(r["timing"]["methods_s"] for r in results), 2)
    timing["per_user_s"] = [round(r["timing"]["train_s"] + r["timing"]["methods_s"], 2) for r in results]
    leak["user_examples"] = sum(r["examples"] for r in results)
    leak["retrieved_items"] = sum(r["retrieved"] for r in results)
    leak["passed"] = True
    t = time.perf_counter()
    report = _report(bench, data, task, dev_task, root, results, shared_summary, profiles, leak, dev_report)
    _timed(timing, "analysis_s", t)
    timing["this_session_s"] = round(time.perf_counter() - started, 2)
    timing["sessions"] = state.manifest["sessions"]
    timing["code_per_session"] = state.manifest["code"]
    timing["code_changed_between_sessions"] = _code_changed(state.manifest["code"], state.manifest["sessions"])
    timing["total_s"] = round(float(state.manifest["wall_s_before"]) + timing["this_session_s"], 2)
    state.manifest["wall_s_before"] = timing["total_s"]
    state.save("run.json", state.manifest)
    report["timing"] = timing
    return report


def _profiles_stage(
    bench: _Bench, docs: Mapping[str, Sequence[history.DocSnapshot]], timing: dict[str, Any], state: RunState
) -> dict[str, str | None]:
    """The base model, before stage 1, writes the profiles; kept in the run folder so a resume serves the
    same ones."""
    saved = state.load("profiles.json")
    if saved is None:
        t = time.perf_counter()
        generated = _generate_profiles(bench, docs, state)
        _timed(timing, "profiles_s", t)
        state.save("profiles.json", {"texts": generated, "seconds": timing["profiles_s"]})
        (state.root / PARTIAL_PROFILES).unlink(missing_ok=True)
    else:
        generated, timing["profiles_s"] = saved["texts"], saved["seconds"]
    return _apply_profiles(bench, generated)


def _shared_stage(
    bench: _Bench,
    task: ml.RatingTask,
    outside: Sequence[ml.UserSplit],
    docs: Mapping[str, Sequence[history.DocSnapshot]],
    profiles: Mapping[str, str | None],
    leak: dict[str, Any],
    timing: dict[str, Any],
    state: RunState,
) -> tuple[dict[str, Any], int]:
    """Stage 1 on the evaluated users (earlier runs) or on users outside the evaluated set; trained once and
    kept in the run folder, published into this session's store."""
    evaluated = {s.user_id for s in task.users}
    pool = list(outside) if bench.config.shared_pool == "outside" else list(task.users)
    shared_examples = _shared_examples(bench, {s.user_id: docs[s.user_id] for s in pool}, profiles)
    scoped = protocol.unscope(shared_examples)
    leak["shared_examples"] = check_example_leakage(ml.RatingTask(pool), scoped)
    if bench.config.shared_pool == "outside" and set(scoped) & evaluated:
        raise AssertionError("stage 1 was to hold the evaluated users out, but holds some of them")
    leak["shared_examples_from_evaluated_users"] = sum(len(v) for u, v in scoped.items() if u in evaluated)
    summary = state.load("shared/summary.json")
    if summary is None:
        t = time.perf_counter()
        out = _train_shared(bench, shared_examples)
        _timed(timing, "shared_train_s", t)
        state.save_files("shared/files", out.files)
        summary = {**_summary(out), "wall_s": timing["shared_train_s"]}
        state.save("shared/summary.json", summary)
        files: Mapping[str, bytes] = out.files
    else:
        files = state.load_files("shared/files")
        timing["shared_train_s"] = summary["wall_s"]
    return summary, _publish_files(bench, SHARED_OWNER, None, files, summary, None)


def _publish_files(
    bench: _Bench,
    owner: str,
    user_pk: int | None,
    files: Mapping[str, bytes],
    summary: Mapping[str, Any],
    shared: int | None,
) -> int:
    meta = {
        "examples": summary["examples"],
        "steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "source": "eval",
    }
    with unit_of_work(bench.core.db.session_factory) as session:
        row = adapter_service.publish(
            session, bench.core.adapters, owner, user_pk, files, source="trained", shared_version=shared, meta=meta
        )
        return row.version


def _users(
    bench: _Bench,
    task: ml.RatingTask,
    docs: Mapping[str, Sequence[history.DocSnapshot]],
    profiles: Mapping[str, str | None],
    shared_version: int,
    state: RunState,
) -> list[dict[str, Any]]:
    """Stage 2 (one LoRA per user on base + shared, prompts retrieved from EARLIER items only), then every
    method on that user's scored items. Users already in the run folder are read back, not rerun."""
    lm = bench.core.loaded
    config = _train_config(bench.config, bench.settings, shared=False)
    model = None
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(task.users), desc="users", unit="user", disable=not bench.config.progress)
    for index, split in enumerate(task.users):
        name = f"users/{index:04d}.json"
        saved = state.load(name)
        if saved is not None and saved["user"] == split.user_id:
            results.append(saved)
            bar.update(1)
            continue
        if model is None:
            with unit_of_work(bench.core.db.session_factory) as session:
                shared_ref = adapter_service.shared_ref(session, bench.core.store)
            model = bench.jobs.training_model(shared_ref)
        t = time.perf_counter()
        uid, ref = split.user_id, bench.users[split.user_id]
        examples, k = _user_examples(bench, docs[uid], profiles.get(uid))
        check_example_leakage(task, {uid: examples})  # before a single step is taken on them
        out = train_lora(model, lm.tokenizer, examples, config, base_model_name=lm.name)
        summary = _summary(out)
        _publish_files(bench, ref.storage_key, ref.pk, out.files, summary, shared_version)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        rows, retrieved = _user_answers(bench, task, split)
        result = {
            "user": uid,
            "training": summary,
            "train_k": k,
            "examples": len(examples),
            "retrieved": retrieved,
            "rows": rows,
            "timing": {"train_s": round(train_s, 2), "methods_s": round(time.perf_counter() - t, 2)},
        }
        state.save(name, result)
        results.append(result)
        bar.update(1)
    bar.close()
    return results


def _report(
    bench: _Bench,
    data: ml.MovieLens,
    task: ml.RatingTask,
    dev_task: ml.RatingTask,
    root: Path,
    results: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any],
    profiles: Mapping[str, str | None],
    leak: Mapping[str, Any],
    dev_report: Mapping[str, Any] | None,
) -> dict[str, Any]:
    c = bench.config
    rows_json = [row for r in results for row in r["rows"]]
    base, base_dev_mae, shrinkage = reread.baseline_block(data, task, dev_task)
    for i, row in enumerate(rows_json):
        row["pred"] = {**{n: p[i] for n, p in base.items()}, **row["pred"]}
    reread.check_rows(task, rows_json)
    rows = analysis.Rows.from_report(rows_json)
    llm = [m.name for m in c.methods()]
    dev_mae: dict[str, float] = dict(base_dev_mae)
    if c.split == "dev":
        dev_mae.update({k: v for k, v in rows.maes().items() if k not in baselines.KEYS})
    elif dev_report is not None:
        dev_rows = analysis.Rows.from_report(dev_report["predictions"])
        dev_mae.update({k: v for k, v in dev_rows.maes().items() if k not in baselines.KEYS})
    result = analysis.analyse(
        rows,
        llm,
        reference=protocol.REFERENCE,
        dev_mae=dev_mae,
        dev_is_this_split=c.split == "dev",
        resamples=c.bootstrap_resamples,
        seed=c.seed,
    )
    config = _config_report(c, bench, task, root)
    config["leakage_check"] = dict(leak)
    config["baseline_shrinkage"] = {"value": shrinkage, "chosen_on": "dev split (rebuilt from the data)"}
    return {
        "methods": result["methods"],
        "readouts": result["readouts"],
        "baseline_readouts": result["baseline_readouts"],
        "strongest_baseline": result["strongest_baseline"],
        "comparisons": result["comparisons"],
        "config": config,
        "table_markdown": result["markdown"],
        "training": report.training_summary(shared, [r["training"] for r in results], profiles),
        "predictions": rows_json,
    }
