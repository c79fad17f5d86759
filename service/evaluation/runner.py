"""The personalization experiment on MovieLens: every method scored on the same test items.

Drives the real components: users and histories in SQL (history service, migrated SQLite in a temp
dir), BM25 retrieval through the history service, the ONE prompt builder, OPPU training (stage 1: a
shared task LoRA on all users' histories; stage 2: one LoRA per user on top of it, prompts retrieved
from EARLIER items only), adapters published to the store and served through AdapterCache + LoraSlots
in mixed batches of many users. The methods, presets and leakage checks are `protocol`'s, the scoring
`report`'s; no HTTP.
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
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
from service.evaluation import metrics, protocol, report
from service.evaluation import movielens as ml
from service.evaluation.protocol import (
    EV,
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


class _NoQueue:
    def enqueue(self, job_id: str, attempt: int) -> None: ...
    def depth(self) -> int:
        return 0

    def publish_adapter(self, owner_key: str, version: int | None) -> None: ...
    def publish_revoked(self, key_hashes: list[str]) -> None: ...
    def subscribe(self, listeners: object, stop: object) -> None: ...
    def close(self) -> None: ...


def _settings(base: Settings, workdir: Path, config: EvalConfig) -> Settings:
    user_targets = LoraTrainConfig.from_settings(base, stage="user").target_modules
    shared_targets = LoraTrainConfig.from_settings(base, stage="shared").target_modules
    return base.model_copy(
        update={
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
            "bm25_cache_users": max(base.bm25_cache_users, config.users),
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
    jobs = composition.job_context(settings, _NoQueue(), core.db, core.store)
    core.engine.start()
    return _Bench(config, core, jobs, {})


def _store_histories(bench: _Bench, task: ml.RatingTask) -> dict[str, list[history.DocSnapshot]]:
    with unit_of_work(bench.core.db.session_factory) as session:
        for split in task.users:
            ref, _key = user_accounts.create_user(session, split.user_id)
            items = [HistoryItemIn(**ml.history_item(h)) for h in split.history]
            history.append(session, ref, HistoryAppendIn(items=items))
            bench.users[split.user_id] = ref
    with unit_of_work(bench.core.db.session_factory) as session:  # read back: training sees what SQL holds
        return {
            uid: [history.snapshot(i) for i in history_repo.all_items(session, ref.pk)]
            for uid, ref in bench.users.items()
        }


def _generate(bench: _Bench, specs: Sequence[GenerationSpec], desc: str) -> tuple[list[str], list[PreparedRequest]]:
    """Answers in request order. Every request goes through the server's own preparation step and engine,
    all queued at once: the engine batches them across users (adapters disk -> host -> slot as served)."""
    preparer = bench.core.preparer
    prepared = [preparer.prepare(spec) for spec in specs]
    bar = tqdm(total=len(prepared), desc=desc, unit="req", disable=not bench.config.progress)

    async def one(p: PreparedRequest) -> str:
        done = await collect(preparer.engine, p.request)
        bar.update(1)
        return preparer.codec.decode(done.token_ids).strip()

    async def run_all() -> list[str]:
        return list(await asyncio.gather(*(one(p) for p in prepared)))

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


def _make_profiles(bench: _Bench, docs: Mapping[str, Sequence[history.DocSnapshot]]) -> dict[str, str | None]:
    """PAG: the BASE model (no shared LoRA yet) writes a profile from each user's recent history."""
    n = bench.config.profile_items
    uids = [u for u in bench.users if docs[u]]
    base = LlmMethod("profile", 0, False, False)
    max_new = bench.config.profile_new_tokens
    specs = [_spec(bench, bench.users[u], build_profile_prompt(list(docs[u])[-n:]), base, max_new) for u in uids]
    texts, _ = _generate(bench, specs, "profiles")
    with unit_of_work(bench.core.db.session_factory) as session:
        for uid, text in zip(uids, texts, strict=True):
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


def _publish(bench: _Bench, owner: str, user_pk: int | None, out: TrainOutput, shared: int | None) -> int:
    meta = {"examples": out.examples, "steps": out.steps, "final_loss": out.final_loss, "source": "eval"}
    with unit_of_work(bench.core.db.session_factory) as session:
        row = adapter_service.publish(
            session, bench.core.adapters, owner, user_pk, out.files, source="trained", shared_version=shared, meta=meta
        )
        return row.version


def _train_shared(bench: _Bench, examples: Sequence[TrainExample]) -> tuple[int, TrainOutput]:
    """Stage 1 on the plain base; the next request the preparation step makes notices the new shared
    version, and the engine merges it into the served base before that request runs."""
    lm = bench.core.loaded
    config = _train_config(bench.config, bench.settings, shared=True)
    steps = config.epochs_for(len(examples)) * math.ceil(len(examples) / config.batch_size)
    with tqdm(total=steps, desc="shared LoRA", unit="step", disable=not bench.config.progress) as bar:
        out = train_lora(
            bench.jobs.training_model(None),
            lm.tokenizer,
            examples,
            config,
            base_model_name=lm.name,
            progress=lambda done: bar.update(round(done * steps) - bar.n),
        )
    return _publish(bench, SHARED_OWNER, None, out, None), out


def _train_users(
    bench: _Bench, task: ml.RatingTask, docs: Mapping[str, Sequence[history.DocSnapshot]], shared: int
) -> tuple[dict[str, list[TrainExample]], list[TrainOutput]]:
    """Stage 2: one LoRA per user on (base + shared), prompts retrieved from EARLIER items only."""
    s, lm = bench.settings, bench.core.loaded
    config = _train_config(bench.config, bench.settings, shared=False)
    with unit_of_work(bench.core.db.session_factory) as session:
        shared_ref = adapter_service.shared_ref(session, bench.core.store)
    model = bench.jobs.training_model(shared_ref)
    examples: dict[str, list[TrainExample]] = {}
    outs: list[TrainOutput] = []
    for uid, ref in tqdm(bench.users.items(), desc="user LoRAs", unit="user", disable=not bench.config.progress):
        k = bench.config.user_train_k if bench.config.user_train_k is not None else s.train_retrieval_k
        examples[uid] = build_user_examples(
            docs[uid], k=k, item_chars=s.retrieval_item_chars, profile_chars=s.profile_max_chars
        )
        check_example_leakage(task, {uid: examples[uid]})  # before a single step is taken on them
        out = train_lora(model, lm.tokenizer, examples[uid], config, base_model_name=lm.name)
        _publish(bench, ref.storage_key, ref.pk, out, shared)
        outs.append(out)
    return examples, outs


def _method_answers(bench: _Bench, task: ml.RatingTask, method: LlmMethod) -> tuple[list[str], int]:
    """Every test item's answer under `method`, its prompt built by the server's preparation step; and how
    many history items were retrieved into those prompts (each checked against the test items)."""
    tests = protocol.test_ids(task)
    specs, owners = [], []
    for split in task.users:
        for item in split.test:
            specs.append(
                _spec(bench, bench.users[split.user_id], ml.item_input(item), method, bench.config.max_new_tokens)
            )
            owners.append(split.user_id)
    answers, prepared = _generate(bench, specs, method.name)
    for user, p in zip(owners, prepared, strict=True):
        check_retrieved_leakage(user, tests, (r.id for r in p.retrieved))
        if method.adapter and p.adapter_version is None:
            raise RuntimeError(f"{user} has no adapter")
    return answers, sum(len(p.retrieved) for p in prepared)


def _method_expected(bench: _Bench, task: ml.RatingTask, method: LlmMethod) -> list[float]:
    """Every test item's expected rating under `method`: the ratings 0.5..5.0 scored as the answer (prefill
    only, one scoring row per item), averaged under their normalised probabilities."""
    preparer, specs = bench.core.preparer, []
    for split in task.users:
        for item in split.test:
            spec = _spec(bench, bench.users[split.user_id], ml.item_input(item), method, 1)
            specs.append(replace(spec, candidates=protocol.RATINGS))
    prepared = [preparer.prepare(spec) for spec in specs]
    bar = tqdm(total=len(prepared), desc=method.name + EV, unit="req", disable=not bench.config.progress)

    async def one(p: PreparedRequest) -> float:
        done = await collect(preparer.engine, p.request)
        bar.update(1)
        return protocol.expected_rating([sum(lps) for lps in done.finished.continuation_logprobs])

    async def run_all() -> list[float]:
        return list(await asyncio.gather(*(one(p) for p in prepared)))

    try:
        return asyncio.run(run_all())
    finally:
        bar.close()


def _config_report(config: EvalConfig, bench: _Bench, task: ml.RatingTask, data_dir: Path) -> dict[str, Any]:
    lm = bench.core.loaded
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
        "data_dir": str(data_dir),
        "split": (
            "temporal: test = each user's last ratings, history = the ratings just before"
            if config.split == "test"
            else "temporal DEV: each user's last test_items ratings dropped unread; scored = the ones just before"
        ),
        "holdout": config.holdout,
        "request": "the test movie's title | genres (movielens.item_input), as in training; also the retrieval query",
        "decoding": "greedy (method) and the expected value over the scored ratings 0.5..5.0 (method_ev)",
        "training": {
            "shared": asdict(_train_config(config, bench.settings, shared=True)),
            "user": asdict(_train_config(config, bench.settings, shared=False)),
        },
        "oppu_rag_k": config.oppu_rag_k,
        "user_lora_train_k": config.user_train_k
        if config.user_train_k is not None
        else bench.settings.train_retrieval_k,
        "tuned_on_test_items": False,
        "methods": {m.name: asdict(m) for m in config.methods()},
    }


def run_eval(
    config: EvalConfig, *, data_dir: Path | str | None = None, settings: Settings | None = None
) -> dict[str, Any]:
    """Runs the whole experiment in a temporary workspace and returns the report (JSON-ready)."""
    started = time.perf_counter()
    timing: dict[str, float] = {}
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    task = ml.build_rating_task(
        ml.load_movielens(root),
        n_users=config.users,
        history_items=config.history_items,
        test_items=config.test_items,
        min_ratings=config.min_ratings or config.history_items + config.test_items,
        seed=config.seed,
        holdout=config.holdout,
    )
    timing["data_s"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="oppu-eval-") as tmp:
        bench = _open_bench(config, _settings(settings or Settings(), Path(tmp), config))
        try:
            return _run(bench, task, root, timing, started)
        finally:
            bench.core.engine.stop()
            bench.core.db.dispose()


def _timed(timing: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    timing[name] = round(now - since, 2)
    return now


def _run(bench: _Bench, task: ml.RatingTask, root: Path, timing: dict[str, float], started: float) -> dict[str, Any]:
    t = _timed(timing, "setup_s", started)
    docs = _store_histories(bench, task)
    leak = {"history_items": check_history_leakage(task, docs)}
    profiles = _make_profiles(bench, docs)
    t = _timed(timing, "profiles_s", t)
    shared_examples = _shared_examples(bench, docs, profiles)
    leak["shared_examples"] = check_example_leakage(task, protocol.unscope(shared_examples))
    shared_version, shared_out = _train_shared(bench, shared_examples)
    t = _timed(timing, "shared_train_s", t)
    user_examples, user_outs = _train_users(bench, task, docs, shared_version)
    leak["user_examples"] = check_example_leakage(task, user_examples)
    t = _timed(timing, "user_train_s", t)
    preds = protocol.baseline_predictions(task)
    raw: dict[str, list[str]] = {}
    leak["retrieved_items"] = 0
    for method in bench.config.methods():
        raw[method.name], n_retrieved = _method_answers(bench, task, method)
        leak["retrieved_items"] += n_retrieved
        preds[method.name] = [metrics.parse_rating(text) for text in raw[method.name]]
        t = _timed(timing, f"generate_{method.name}_s", t)
        preds[method.name + EV] = list(_method_expected(bench, task, method))
        t = _timed(timing, f"score_{method.name}_s", t)
    golds = [item.rating for split in task.users for item in split.test]
    results, ci = report.score(golds, preds, resamples=bench.config.bootstrap_resamples, seed=bench.config.seed)
    _timed(timing, "total_s", started)
    config = _config_report(bench.config, bench, task, root)
    config["leakage_check"] = {**leak, "passed": True}
    return {
        "methods": {name: asdict(r) for name, r in results.items()},
        "config": config,
        "ci": {name: asdict(c) for name, c in ci.items()},
        "table_markdown": report.markdown_report(results, ci),
        "timing": timing,
        "training": report.training_report(shared_out, user_outs, profiles),
        "predictions": report.prediction_rows(task, golds, preds, raw),
    }
