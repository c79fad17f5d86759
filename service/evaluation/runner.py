"""The personalization experiment on MovieLens: every method scored on the same test items.

Drives the real components: users and histories in SQL (history service, migrated SQLite in a temp
dir), BM25 retrieval through the history service, the ONE prompt builder, OPPU training (stage 1: a
shared task LoRA on all users' histories; stage 2: one LoRA per user on top of it, prompts retrieved
from EARLIER items only), adapters published to the store and served through AdapterCache + LoraSlots
in mixed batches of many users. The methods, presets and leakage checks are `protocol`'s, the scoring
`report`'s; no HTTP.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from service import users as user_accounts
from service.adapters import service as adapter_service
from service.adapters.cache import AdapterCache, AdapterKey
from service.adapters.service import AdapterContext
from service.adapters.slots import LoraSlots
from service.adapters.store import AdapterStore
from service.adapters.validation import BaseModelSpec, ValidationLimits
from service.config import Settings
from service.db.migrate import upgrade
from service.db.models import SHARED_OWNER
from service.db.session import make_engine, make_session_factory, unit_of_work
from service.evaluation import metrics, protocol, report
from service.evaluation import movielens as ml
from service.evaluation.protocol import (
    SCOPE,
    EvalConfig,
    LlmMethod,
    check_example_leakage,
    check_history_leakage,
    check_retrieved_leakage,
    default_data_dir,
)
from service.history import repository as history_repo
from service.history import service as history
from service.history.schemas import HistoryAppendIn, HistoryItemIn
from service.inference.engine import GenRow
from service.inference.loader import load_model
from service.inference.runtime import ModelRuntime
from service.prompts import build_profile_prompt, build_prompt
from service.retrieval.bm25 import BM25Cache
from service.tenancy import UserRef
from service.training.examples import TrainExample, build_shared_examples, build_user_examples
from service.training.trainer import LoraTrainConfig, TrainOutput, merge_lora_into, train_lora

# --- the serving side: SQL, store, runtime, adapter cache ---


@dataclass
class _Bench:
    config: EvalConfig
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    store: AdapterStore
    runtime: ModelRuntime
    cache: AdapterCache
    adapters: AdapterContext
    bm25: BM25Cache[history.UserCorpus]
    train_model: Any  # a plain copy of the base (the served one carries slot layers); shared LoRA merged
    users: dict[str, UserRef]


def _settings(base: Settings, workdir: Path, config: EvalConfig) -> Settings:
    user_targets = LoraTrainConfig().target_modules
    shared_targets = LoraTrainConfig.shared_default().target_modules
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
            "adapter_max_rank": config.rank,
            "adapter_target_modules": tuple(dict.fromkeys((*user_targets, *shared_targets))),
            "bm25_cache_users": max(base.bm25_cache_users, config.users),
        }
    )


def _open_bench(config: EvalConfig, settings: Settings) -> _Bench:
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    loaded = load_model(settings)
    spec = BaseModelSpec.from_model(loaded.model, loaded.name)  # before slots wrap the Linears
    train_model = copy.deepcopy(loaded.model)
    user_targets = LoraTrainConfig().target_modules
    slots = LoraSlots(
        loaded.model, config.gen_batch, config.rank, user_targets, device=loaded.device, dtype=loaded.dtype
    )
    store = AdapterStore(settings.adapters_dir)
    cache = AdapterCache(slots, store, host_budget_bytes=settings.adapter_host_budget_bytes)
    limits = ValidationLimits.from_settings(settings)
    adapters = AdapterContext(store, spec, limits, settings.adapter_keep_versions, on_drop=cache.drop_owner)
    runtime = ModelRuntime(loaded, settings, slots=slots, adapters=cache)  # scheduler never started
    bm25 = BM25Cache[history.UserCorpus](settings.bm25_cache_users)
    return _Bench(config, settings, engine, factory, store, runtime, cache, adapters, bm25, train_model, {})


def _store_histories(bench: _Bench, task: ml.RatingTask) -> dict[str, list[history.DocSnapshot]]:
    with unit_of_work(bench.factory) as session:
        for split in task.users:
            ref, _key = user_accounts.create_user(session, split.user_id)
            items = [HistoryItemIn(**ml.history_item(h)) for h in split.history]
            history.append(session, ref, HistoryAppendIn(items=items))
            bench.users[split.user_id] = ref
    with unit_of_work(bench.factory) as session:  # read back: training sees what SQL holds
        return {
            uid: [history.snapshot(i) for i in history_repo.all_items(session, ref.pk)]
            for uid, ref in bench.users.items()
        }


def _generate(bench: _Bench, requests: Sequence[tuple[str, AdapterKey | None]], max_new: int, desc: str) -> list[str]:
    """Greedy answers, in request order. Rows are sorted by length and batched across users; each
    batch's adapters go disk -> host -> slot through the AdapterCache, exactly as the server does."""
    rt = bench.runtime
    params = rt.params(max_new_tokens=max_new, temperature=0.0, top_p=1.0, seed=bench.config.seed)
    encoded = [rt.encode(text, max_new) for text, _ in requests]
    order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
    size = bench.config.gen_batch
    out = [""] * len(requests)
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not bench.config.progress):
        keys = [requests[i][1] for i in batch]
        slots = bench.cache.acquire(keys)
        try:
            rows = [GenRow(encoded[i], params, slot) for i, slot in zip(batch, slots, strict=True)]
            results = rt.generator.generate(rows)
        finally:
            bench.cache.release(keys)
        for i, res in zip(batch, results, strict=True):
            out[i] = rt.decode(res.token_ids).strip()
    return out


def _make_profiles(bench: _Bench, docs: Mapping[str, Sequence[history.DocSnapshot]]) -> dict[str, str | None]:
    """PAG: the BASE model (no shared LoRA yet) writes a profile from each user's recent history."""
    n = bench.config.profile_items
    uids = [u for u in bench.users if docs[u]]
    prompts = [(build_profile_prompt(list(docs[u])[-n:]), None) for u in uids]
    texts = _generate(bench, prompts, bench.config.profile_new_tokens, "profiles")
    with unit_of_work(bench.factory) as session:
        for uid, text in zip(uids, texts, strict=True):
            if text:
                history.set_profile(session, bench.users[uid], text, source="generated")
        return {uid: history.profile_text(session, ref) for uid, ref in bench.users.items()}


def _train_config(config: EvalConfig, *, shared: bool) -> LoraTrainConfig:
    base = LoraTrainConfig.shared_default() if shared else LoraTrainConfig.user_default()
    return replace(
        base,
        rank=config.rank,
        alpha=config.alpha,
        lr=config.shared_lr if shared else config.user_lr,
        epochs=config.shared_epochs if shared else config.user_epochs,
        batch_size=config.shared_batch_size if shared else config.user_batch_size,
        max_seq_len=config.max_seq_len,
        seed=config.seed,
    )


def _shared_examples(
    bench: _Bench, docs: Mapping[str, Sequence[history.DocSnapshot]], profiles: Mapping[str, str | None]
) -> list[TrainExample]:
    """Stage 1 sees every prompt shape the baselines use (k in shared_ks, and the profile), each on a
    seeded share of every user's history, so that no baseline is off the task LoRA's training format."""
    s, c = bench.settings, bench.config
    variants: list[tuple[int, Mapping[str, str | None] | None]] = [(k, None) for k in c.shared_ks]
    variants.append((0, profiles))
    per_user = max(1, math.ceil(c.history_items / len(variants)))
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
    with unit_of_work(bench.factory) as session:
        row = adapter_service.publish(
            session, bench.adapters, owner, user_pk, out.files, source="trained", shared_version=shared, meta=meta
        )
        return row.version


def _train_shared(bench: _Bench, examples: Sequence[TrainExample]) -> tuple[int, TrainOutput]:
    """Stage 1, then the shared LoRA is merged into the served base (as at start-up) and the training copy."""
    lm = bench.runtime.loaded
    config = _train_config(bench.config, shared=True)
    steps = config.epochs * math.ceil(len(examples) / config.batch_size)
    with tqdm(total=steps, desc="shared LoRA", unit="step", disable=not bench.config.progress) as bar:
        out = train_lora(
            bench.train_model,
            lm.tokenizer,
            examples,
            config,
            base_model_name=lm.name,
            progress=lambda done: bar.update(round(done * steps) - bar.n),
        )
    version = _publish(bench, SHARED_OWNER, None, out, None)
    bench.runtime.apply_shared_now(adapter_service.shared_weights(bench.store, version), version)
    merge_lora_into(bench.train_model, out.files)
    return version, out


def _train_users(
    bench: _Bench, task: ml.RatingTask, docs: Mapping[str, Sequence[history.DocSnapshot]], shared: int
) -> tuple[dict[str, list[TrainExample]], list[TrainOutput]]:
    """Stage 2: one LoRA per user on (base + shared), prompts retrieved from EARLIER items only."""
    s, lm = bench.settings, bench.runtime.loaded
    config = _train_config(bench.config, shared=False)
    examples: dict[str, list[TrainExample]] = {}
    outs: list[TrainOutput] = []
    for uid, ref in tqdm(bench.users.items(), desc="user LoRAs", unit="user", disable=not bench.config.progress):
        examples[uid] = build_user_examples(
            docs[uid], k=bench.config.oppu_rag_k, item_chars=s.retrieval_item_chars, profile_chars=s.profile_max_chars
        )
        check_example_leakage(task, {uid: examples[uid]})  # before a single step is taken on them
        out = train_lora(bench.train_model, lm.tokenizer, examples[uid], config, base_model_name=lm.name)
        _publish(bench, ref.storage_key, ref.pk, out, shared)
        outs.append(out)
    return examples, outs


def _method_requests(
    bench: _Bench, task: ml.RatingTask, method: LlmMethod
) -> tuple[list[tuple[str, AdapterKey | None]], int]:
    """Each test item's prompt for `method`, built as serving builds it; and how many items were retrieved."""
    s, tests = bench.settings, protocol.test_ids(task)
    requests: list[tuple[str, AdapterKey | None]] = []
    n_retrieved = 0
    with unit_of_work(bench.factory) as session:
        for split in task.users:
            ref = bench.users[split.user_id]
            profile = history.profile_text(session, ref) if method.profile else None
            key = None
            if method.adapter:
                key, _version = adapter_service.serving_key(session, ref.storage_key, bench.adapters.spec)
                if key is None:
                    raise RuntimeError(f"{split.user_id} has no adapter")
            for item in split.test:
                # The query is the movie text, as in training (training_request = item input), whatever
                # the request: the question's "0.5 to 5.0" would pull in items rated 0.5 or 5.0.
                hits = history.retrieve(session, ref, ml.item_input(item), method.k, bench.bm25)
                check_retrieved_leakage(split.user_id, tests, (h.doc.id for h in hits))
                n_retrieved += len(hits)
                text = build_prompt(
                    bench.config.request_text(item),
                    [h.doc for h in hits],
                    profile,
                    item_chars=s.retrieval_item_chars,
                    profile_chars=s.profile_max_chars,
                )
                requests.append((text, key))
    return requests, n_retrieved


def _config_report(config: EvalConfig, bench: _Bench, task: ml.RatingTask, data_dir: Path) -> dict[str, Any]:
    lm = bench.runtime.loaded
    return {
        **{k: v for k, v in asdict(config).items() if k != "progress"},
        "users": len(task.users),
        "items": sum(len(s.test) for s in task.users),
        "seeds": {"data": config.seed, "train": config.seed, "bootstrap": config.seed},
        "epochs": {"shared": config.shared_epochs, "user": config.user_epochs},
        "lr": {"shared": config.shared_lr, "user": config.user_lr},
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
        "retrieval_query": "the test movie's title | genres (movielens.item_input), as in training",
        "decoding": "greedy",
        "oppu_rag_k": config.oppu_rag_k,
        "user_lora_train_k": config.oppu_rag_k,
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
        min_ratings=config.history_items + config.test_items,
        seed=config.seed,
        holdout=config.holdout,
    )
    timing["data_s"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="oppu-eval-") as tmp:
        bench = _open_bench(config, _settings(settings or Settings(), Path(tmp), config))
        try:
            return _run(bench, task, root, timing, started)
        finally:
            bench.engine.dispose()


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
        requests, n_retrieved = _method_requests(bench, task, method)
        leak["retrieved_items"] += n_retrieved
        raw[method.name] = _generate(bench, requests, bench.config.max_new_tokens, method.name)
        preds[method.name] = [metrics.parse_rating(text) for text in raw[method.name]]
        t = _timed(timing, f"generate_{method.name}_s", t)
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
