"""THE composition root: the only module that wires components together. It builds the serving core
(database, store, model, engine, preparation step), the API process's state around it, the job context
(in-process runner, RQ worker, `oppu train`) and the evaluation's core, all from Settings.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from service.adapters import service as adapter_service
from service.adapters.cache import AdapterCache
from service.adapters.service import AdapterContext
from service.adapters.slots import LoraSlots
from service.adapters.store import AdapterStore
from service.adapters.uploads import UploadGate
from service.adapters.validation import BaseModelSpec, ValidationLimits
from service.batching.tenant_gate import TenantGate
from service.config import Settings, get_settings
from service.data_rights import UserErased
from service.db.migrate import check_migrated
from service.db.models import SHARED_OWNER
from service.db.session import Database, unit_of_work
from service.engine.base import Engine, EngineFront
from service.engine.builtin.engine import BuiltinEngine
from service.engine.builtin.packed import can_pack
from service.generation.grammar import GrammarCompiler
from service.generation.prepare import Preparer
from service.history.service import UserCorpus
from service.inference.loader import LoadedModel, load_model
from service.inference.threads import release_pool
from service.inference.tokens import PromptCodec
from service.jobs import entry
from service.jobs.queue import InProcessJobQueue, JobQueue, Listeners, make_queue
from service.jobs.service import shared_retrainer
from service.jobs.tasks import JobContext, recover_in_process, run_job
from service.jobs.worker import run_reaper
from service.metrics import FieldCollector, JobQueueCollector, Metrics, SqlStateCollector
from service.notices.outbox import start_polling
from service.ratelimit import FailedAuthLimiter
from service.retrieval.bm25 import BM25Cache
from service.sealing import operations as sealing_ops
from service.sealing import repository as keyring_repo
from service.sealing.kek import KeyEncryptionKeys, Keyset, LocalKeyset, MasterKeyError, write_keyset
from service.sealing.models import KeyringBase
from service.sealing.service import Sealer
from service.sealing.session import sealer_of_factory, session_info
from service.state import AppState
from service.streams import StreamRegistry

log = logging.getLogger(__name__)
ADMIN_KEY_FILE = "admin_key"


# --- admin key ---


def admin_key(settings: Settings) -> str:
    """OPPU_ADMIN_KEY, else (embedded default only) the key `oppu serve` generated into the data dir."""
    if settings.admin_key is not None and settings.admin_key.get_secret_value():
        return settings.admin_key.get_secret_value()
    if make_url(settings.resolved_database_url).get_backend_name() != "sqlite":
        raise RuntimeError("OPPU_ADMIN_KEY must be set when OPPU_DATABASE_URL is not SQLite")
    path = Path(settings.data_dir) / ADMIN_KEY_FILE
    if not path.is_file():
        raise RuntimeError(f"no admin key: set OPPU_ADMIN_KEY, or start with `oppu serve`, which creates {path}")
    return path.read_text().strip()


def ensure_admin_key(settings: Settings) -> Settings:
    """Embedded default: generate the admin key once (printed once, kept in the data dir, mode 0600)."""
    if settings.admin_key is not None and settings.admin_key.get_secret_value():
        return settings
    if make_url(settings.resolved_database_url).get_backend_name() != "sqlite":
        raise RuntimeError("OPPU_ADMIN_KEY must be set when OPPU_DATABASE_URL is not SQLite")
    path = Path(settings.data_dir) / ADMIN_KEY_FILE
    if not path.is_file():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = "oppu_admin_" + secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
        # The path, never the key: stdout ends up in logs that others read.
        print(f"OPPU admin key generated: {path} (mode 0600; `cat` it to use it)", flush=True)
    return settings.with_overrides(admin_key=admin_key(settings))


# --- parts ---


def database(settings: Settings, seals: Sealer | None = None) -> Database:
    """The main database; every session carries the sealer (its repositories seal and open user data)."""
    seals = seals if seals is not None else sealer(settings)
    db = Database.open(
        settings.resolved_database_url, sqlite_synchronous=settings.sqlite_synchronous, info=session_info(seals)
    )
    try:
        check_migrated(db.engine)
    except BaseException:
        db.dispose()
        raise
    return db


def sealer_of(db: Database) -> Sealer:
    return sealer_of_factory(db.session_factory)


def sealer(settings: Settings) -> Sealer:
    """The keyring (its own database) and the master key(s). Nothing is overwritten: a keyring that holds keys
    without the master key that wrapped them refuses to start (MasterKeyError), never makes a new one."""
    keyring = Database.open(settings.resolved_keyring_url, sqlite_synchronous=settings.sqlite_synchronous)
    _create_keyring_tables(keyring)
    if not settings.keyring_url and make_url(settings.resolved_database_url).get_backend_name() != "sqlite":
        log.warning(
            "the keyring is a SQLite file in OPPU_DATA_DIR (%s) while the database is shared: every replica and "
            "worker must share it; on several hosts set OPPU_KEYRING_URL to one keyring database",
            settings.resolved_keyring_url,
        )
    keks = master_keys(settings, keyring)
    enabled = settings.seal_at_rest and keks is not None
    return Sealer(keyring.session_factory, keks, enabled=enabled, recheck_s=settings.key_recheck_s)


KEYRING_CREATE_ATTEMPTS = 10


def _create_keyring_tables(keyring: Database) -> None:
    """create_all checks, then creates, table by table: processes starting together on one keyring each find a
    table missing and one of them fails on every table another created meanwhile (an API of three processes
    once exited on `table shredded_owners already exists` after one retry). Retried until none is missing."""
    for attempt in range(1, KEYRING_CREATE_ATTEMPTS + 1):
        try:
            KeyringBase.metadata.create_all(keyring.engine)
            return
        except DBAPIError:
            if attempt == KEYRING_CREATE_ATTEMPTS:
                raise
            time.sleep(0.05 * attempt)


def check_sealed(settings: Settings, db: Database) -> None:
    """Sealing on: refuse to serve a half-sealed deployment (rows or adapter files still plaintext) unless
    OPPU_SEAL_ALLOW_PLAINTEXT says so; `oppu keys seal-existing` seals them."""
    if not settings.seal_at_rest or settings.seal_allow_plaintext or not sealer_of(db).enabled:
        return
    with unit_of_work(db.session_factory) as session:
        plain = sealing_ops.plaintext_counts(session)
    if any(plain.values()):
        raise MasterKeyError(
            f"sealing is on but some stored data is still plaintext ({plain}): run `oppu keys seal-existing`, "
            "or set OPPU_SEAL_ALLOW_PLAINTEXT=true to serve meanwhile"
        )


def master_keys(settings: Settings, keyring: Database) -> KeyEncryptionKeys | None:
    """OPPU_MASTER_KEY, else OPPU_MASTER_KEY_FILE; the embedded default generates its file once (while the
    keyring is empty); elsewhere one must be given (every replica needs the same one)."""
    if settings.master_key is not None and settings.master_key.get_secret_value():
        keyset = Keyset.parse(settings.master_key.get_secret_value())
        return LocalKeyset(inline=keyset.keys[keyset.primary])
    path = settings.resolved_master_key_file
    if path.is_file() or settings.master_key_file is not None:
        return LocalKeyset(path=path)
    with keyring.session_factory() as session:
        in_use = keyring_repo.kek_counts(session)
    if in_use:
        raise MasterKeyError(
            f"the keyring holds data keys but the master key file {path} is gone: set OPPU_MASTER_KEY_FILE to "
            "the right file (nothing was generated, nothing was overwritten)"
        )
    if not settings.seal_at_rest:
        return None
    if make_url(settings.resolved_database_url).get_backend_name() != "sqlite":
        raise MasterKeyError("set OPPU_MASTER_KEY_FILE (or OPPU_MASTER_KEY) when OPPU_DATABASE_URL is not SQLite")
    try:
        write_keyset(path, Keyset.single(os.urandom(32)), exclusive=True)
        print(
            f"OPPU master key generated: {path} (mode 0600). Every user's data is sealed under keys it wraps: "
            "BACK IT UP apart from the database and the keyring; without it nothing can be read.",
            file=sys.stderr,
            flush=True,
        )
    except (MasterKeyError, FileExistsError):
        pass  # another process made it first
    return LocalKeyset(path=path)


def adapter_context(
    settings: Settings, store: AdapterStore, spec: BaseModelSpec, notify: JobQueue | None = None
) -> AdapterContext:
    return AdapterContext(
        store=store,
        spec=spec,
        limits=ValidationLimits.from_settings(settings),
        keep_versions=settings.adapter_keep_versions,
        notify=notify.publish_adapter if notify is not None else None,
        shared_on_erase=settings.shared_on_erase,
        retrain_shared=shared_retrainer(notify) if notify is not None else None,
    )


def builtin_engine(settings: Settings, loaded: LoadedModel, metrics: Metrics | None) -> BuiltinEngine:
    """The base model wrapped with LoRA slots, the tiered adapter cache and the scheduler."""
    slots = LoraSlots(
        loaded.model,
        settings.adapter_slots,
        settings.adapter_max_rank,
        settings.adapter_target_modules,
        device=loaded.device,
        dtype=loaded.dtype,
    )
    cache = AdapterCache(
        slots,
        host_budget_bytes=settings.adapter_host_budget_bytes,
        max_scale=settings.adapter_max_scale,
        on_event=metrics.on_cache_event if metrics is not None else None,
    )
    return BuiltinEngine(
        loaded,
        cache,
        slots,
        max_rows=settings.batch_max_size,
        max_model_len=max_model_len(settings, loaded),
        max_batch_tokens=settings.max_batch_tokens,
        window_s=settings.batch_window_ms / 1000.0,
        queue_max=settings.queue_max,
        queue_per_tenant=settings.queue_per_user_max,
        fair_share=settings.fair_share,
        max_scale=settings.adapter_max_scale,
        packed_weights=settings.packed_weights == "auto" and can_pack(loaded.device, loaded.dtype),
        on_step=metrics.on_step if metrics is not None else None,
    )


def vllm_engine(settings: Settings, loaded: LoadedModel, metrics: Metrics | None) -> Engine:
    """vLLM (the [vllm] extra) with our slots, queues and limits; imported only when chosen."""
    from service.engine.vllm.engine import VllmConfig, VllmEngine

    if loaded.path is None:
        raise ValueError("OPPU_ENGINE=vllm needs a local model folder (OPPU_MODEL, or the default model)")
    config = VllmConfig(
        model_dir=loaded.path,
        model_name=loaded.name,
        dtype=str(loaded.dtype).removeprefix("torch."),
        max_model_len=max_model_len(settings, loaded),
        max_rows=settings.batch_max_size,
        max_batch_tokens=settings.max_batch_tokens,
        adapter_slots=settings.adapter_slots,
        max_cpu_loras=settings.vllm_max_cpu_loras or 4 * settings.adapter_slots,
        max_lora_rank=settings.vllm_max_lora_rank,
        max_scale=settings.adapter_max_scale,
        kv_cache_gib=settings.vllm_kv_cache_gib,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        prefix_caching=settings.vllm_prefix_caching,
        queue_max=settings.queue_max,
        queue_per_tenant=settings.queue_per_user_max,
        fair_share=settings.fair_share,
        work_dir=vllm_lora_dir(settings),
        target_modules=tuple(settings.adapter_target_modules),
        seed=0,
    )
    return VllmEngine(config, on_step=metrics.on_step if metrics is not None else None)


def vllm_lora_dir(settings: Settings) -> Path:
    """vLLM reads LoRAs from folders, in plaintext: with sealing they live in memory-backed storage (/dev/shm,
    a folder of this process), removed on eviction and at stop, never on disk."""
    shm = Path("/dev/shm")
    if settings.seal_at_rest and shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="oppu-vllm-loras-", dir=shm))
    if settings.seal_at_rest:  # said once at start: the operator must know that plaintext weights touch the disk
        log.warning(
            "OPPU_SEAL_AT_REST is on but /dev/shm is not writable: the vLLM engine's LoRA folders (plaintext) "
            "live in %s, on disk; mount a tmpfs at /dev/shm to keep them off it",
            settings.data_dir / "vllm-loras",
        )
    return settings.data_dir / "vllm-loras"


def max_model_len(settings: Settings, loaded: LoadedModel) -> int:
    """OPPU_MAX_MODEL_LEN, never above the model's own context."""
    context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or settings.max_model_len)
    return min(settings.max_model_len, context)


@dataclass
class Core:
    """What serves generation: the same for the API process and the evaluation."""

    settings: Settings
    db: Database
    store: AdapterStore
    bm25: BM25Cache[UserCorpus]
    loaded: LoadedModel
    adapters: AdapterContext
    engine: Engine
    preparer: Preparer


def core(settings: Settings, metrics: Metrics | None = None) -> Core:
    seals = sealer(settings)
    try:
        seals.check_keks()  # a wrong or missing master key stops the start here, before anything is written
        db = database(settings, seals)
    except BaseException:
        seals.close()
        raise
    try:
        return _core_on(settings, metrics, seals, db)
    except BaseException:  # a refused start (half-sealed data, a model that does not load) leaves no pool open
        db.dispose()
        seals.close()
        raise


def _core_on(settings: Settings, metrics: Metrics | None, seals: Sealer, db: Database) -> Core:
    check_sealed(settings, db)
    store = AdapterStore(settings.adapters_dir, seals)
    window = settings.retrieval_max_chars or None
    bm25 = BM25Cache[UserCorpus](settings.bm25_cache_users, max_bytes=settings.bm25_cache_bytes, window_chars=window)
    loaded = load_model(settings, weights=settings.engine == "builtin")
    spec = BaseModelSpec.from_model(loaded.model, loaded.name)  # before slots wrap the Linears
    engine = (
        builtin_engine(settings, loaded, metrics)
        if settings.engine == "builtin"
        else vllm_engine(settings, loaded, metrics)
    )
    if metrics is not None and isinstance(engine, EngineFront):
        engine.on_reject.append(metrics.on_rejected)
    adapters = adapter_context(settings, store, spec)
    codec = PromptCodec(loaded.tokenizer, loaded.model.config)
    grammars = GrammarCompiler(loaded.tokenizer, codec.vocab_size)
    preparer = Preparer(settings, db.session_factory, bm25, store, spec, codec, engine, grammars)
    with unit_of_work(db.session_factory) as session:
        engine.use_shared(adapter_service.shared_ref(session, store))  # start-up: the current shared LoRA
    release_pool()  # the loading thread is done with torch
    return Core(settings, db, store, bm25, loaded, adapters, engine, preparer)


def job_context(
    settings: Settings, queue: JobQueue, db: Database | None = None, store: AdapterStore | None = None
) -> JobContext:
    db = db or database(settings)
    return JobContext(settings, db.session_factory, store or AdapterStore(settings.adapters_dir, sealer_of(db)), queue)


def worker_job_context(*, reconcile_store: bool = False) -> JobContext:
    """The RQ worker's context (the parent reconciles the store at start-up; each work horse builds its own)."""
    settings = get_settings()
    ctx = job_context(settings, make_queue(settings))
    if reconcile_store:  # the worker parent: its forked work horses build their context with this factory
        reconcile(database(settings), ctx.store)
        entry.install(worker_job_context)
    return ctx


# --- the API process ---


def app_state(settings: Settings, metrics: Metrics) -> AppState:
    served = core(settings, metrics)
    queue = make_queue(settings)
    adapters = adapter_context(settings, served.store, served.adapters.spec, queue)  # changes reach every replica
    jobs = job_context(settings, queue, served.db, served.store)
    metrics.registry.register(SqlStateCollector(served.db.session_factory))
    metrics.registry.register(JobQueueCollector(queue.depth))
    residency = served.engine.cache.residency if isinstance(served.engine, BuiltinEngine) else None  # vLLM: none
    metrics.registry.register(FieldCollector(served.engine.stats, residency, served.db.session_factory))
    return AppState(
        settings=settings,
        db=served.db,
        admin_key=admin_key(settings),
        bm25=served.bm25,
        store=served.store,
        adapters=adapters,
        engine=served.engine,
        preparer=served.preparer,
        queue=queue,
        jobs=jobs,
        metrics=metrics,
        auth_limiter=FailedAuthLimiter(settings.auth_max_failures, settings.auth_failure_window_s),
        uploads=UploadGate(settings.upload_concurrency, settings.upload_concurrency_per_user),
        downloads=UploadGate(settings.download_concurrency, settings.download_concurrency_per_user, "download"),
        streams=StreamRegistry(remember_s=settings.request_timeout_s + 60.0),
        history_writes=TenantGate(
            settings.history_writes_per_user_max, settings.queue_per_user_max, "history writes of this user at once"
        ),
        stopping=jobs.stopping,  # one shutdown signal: listeners end, the running job stops at its next step
    )


_SHARED_APPLY = threading.Lock()  # on_adapter_change: one shared-version read-and-apply at a time
RECONCILE_OLDER_THAN_S = 3600.0  # an in-flight publish of another process is younger than this
NOTICES_JOIN_S = 10.0  # stop: a poll in progress ends before the database is disposed


def reconcile(db: Database, store: AdapterStore) -> None:
    """Start-up: store and SQL back in line after crashes (orphan dirs, rows without files, temp dirs)."""
    with unit_of_work(db.session_factory) as session:
        done = adapter_service.reconcile(session, store, RECONCILE_OLDER_THAN_S)
    log.info("reconciled the adapter store: %s", done)


def start(state: AppState) -> None:
    """Reconciliation, the engine, then the job runner (embedded) or the adapter-change subscriber (Redis)."""
    reconcile(state.db, state.store)
    state.engine.start()
    if isinstance(state.queue, InProcessJobQueue):
        state.queue.attach(lambda job_id: run_job(state.jobs, job_id))
        recover_in_process(state.jobs)
        # The reaper the worker runs, here too: a job whose claim or failure record hit a database error is
        # retried within job_stale_after_s instead of holding its owner's one active job until a restart.
        state.reaper = threading.Thread(
            target=run_reaper, args=(state.settings, state.jobs, state.stopping), name="oppu-reaper", daemon=True
        )
        state.reaper.start()
    listeners = Listeners(
        lambda owner, version: on_adapter_change(state, owner, version),
        state.streams.revoke,
        lambda storage_key: on_user_erased(state, storage_key),
    )
    # Pub/sub is the fast path; the SQL outbox, polled, brings what it lost while Redis was down.
    state.notices = start_polling(
        state.session_factory,
        listeners,
        poll_s=state.settings.notice_poll_s,
        keep_s=state.settings.notice_keep_s,
        stop=state.stopping,
        subscribe=lambda fast: state.queue.subscribe(fast, state.stopping),
    )


def on_adapter_change(state: AppState, owner_key: str, _version: int | None) -> None:
    """Another process (or this one) published or deleted an adapter. The shared LoRA: the engine takes the
    current version now (requests would notice it anyway). A user's: old cache entries are freed early;
    correctness does not depend on it (every request reads the current version from SQL)."""
    if owner_key == SHARED_OWNER:
        # Read and apply as one step: notices arrive on several threads (the request that committed, pub/sub,
        # the outbox poll), and a read made before an erase retired a version must not land after it.
        with _SHARED_APPLY, unit_of_work(state.session_factory) as session:
            read_at = time.monotonic()  # before the read: requests read earlier never switch the engine back
            state.engine.use_shared(adapter_service.shared_ref(session, state.store), read_at)
        release_pool()  # the read ran on this notice's thread
    else:
        # The BM25 index stays: it depends on the history only (its stamp), not on the adapter. Dropping it on
        # every upload or delete made the user's next request rebuild it from the whole history (8.6 s at
        # 100k items, stalling other users' requests on this process's CPU).
        state.engine.drop_owner(owner_key)
        if _version is None:  # deleted or erased: their opened data keys leave memory too
            sealer_of(state.db).forget(owner_key)


def on_user_erased(state: AppState, storage_key: str) -> None:
    """A user was erased (here or on another replica): their running rows end, their index leaves memory."""
    state.engine.cancel_tenant(storage_key, UserErased("the user was erased"))
    state.bm25.invalidate(storage_key)


def stop(state: AppState) -> None:
    state.stopping.set()
    state.queue.close()
    if state.notices is not None:
        state.notices.join(NOTICES_JOIN_S)
    if state.reaper is not None:  # a tick in progress ends before the database is disposed
        state.reaper.join(NOTICES_JOIN_S)
    state.engine.stop()
    sealer_of(state.db).close()
    state.db.dispose()
