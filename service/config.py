"""Settings: the one typed object read from the environment (prefix OPPU_). Nothing else reads env vars."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
ALL_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The shared task LoRA's shape (OPPU stage 1; training/trainer.LoraTrainConfig.shared_default): here so that the
# settings can check it against the adapter limits every published version must pass.
SHARED_LORA_TARGETS = ("q_proj", "k_proj", "v_proj")
SHARED_LORA_RANK = 8
SHARED_LORA_ALPHA = 8.0
# The longest gap between a notice's insert and its transaction's commit that the outbox poll covers
# (notices/outbox.COMMIT_LAG_S): notices must be kept at least that long after a poll could have read them.
NOTICE_COMMIT_LAG_S = 60.0
MAX_N = 8  # the most rows (OpenAI's `n`) one generate request may ask for; a user's queue share must hold them


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPPU_", extra="ignore")

    # --- storage ---
    data_dir: Path = Path("./data")
    database_url: str | None = None  # default: SQLite file in data_dir
    adapters_dir: Path = Path("./adapters_store")
    redis_url: str | None = None  # unset = embedded in-process job runner
    model_cache_dir: Path | None = None  # default: data_dir / "models"
    # SQLite durability: FULL fsyncs every commit (nothing acknowledged is lost on power loss); NORMAL is
    # faster in WAL mode but may lose the last commits on a power loss (not on a process crash).
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"

    # --- encryption at rest (service/sealing/) ---
    seal_at_rest: bool = True  # history, profiles, adapter files and exports sealed under per-user data keys
    # The key-encryption key: a keyset file (JSON, 0600; `oppu keys rotate-master` adds keys to it) or one
    # base64 key inline. Embedded default: generated into data_dir/master_key on first start (keyring empty).
    master_key_file: Path | None = None
    master_key: SecretStr | None = None
    # The wrapped data keys, in their own database apart from OPPU_DATABASE_URL (default: SQLite in data_dir).
    # Several replicas must share one keyring: set it whenever OPPU_DATABASE_URL is shared.
    keyring_url: str | None = None
    # Serve although some stored data is still plaintext (an `oppu keys seal-existing` in progress).
    seal_allow_plaintext: bool = False
    # How stale a process's cached data keys may be when it picks the key new values are sealed under: after a
    # per-user key rotation every process seals under the new key within this (a rotation waits it out).
    key_recheck_s: float = Field(5.0, gt=0)

    # --- model ---
    model: str = DEFAULT_MODEL  # the default GGUF, a local HF folder, or an id already in the HF cache
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    torch_threads: int | None = Field(None, ge=1)
    # The builtin engine's Linears on weights packed once for oneDNN: "auto" where it was measured to pay (a CPU
    # with native bf16 matmul, bf16 or fp32: engine/builtin/packed.py); "off": plain weights (half the memory).
    packed_weights: Literal["auto", "off"] = "auto"

    # --- auth / http ---
    admin_key: SecretStr | None = None
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1)
    # every other request body must arrive within this (408 after): a stalled body holds a request slot
    body_timeout_s: float = Field(30.0, gt=0)
    docs_enabled: bool = True
    auth_max_failures: int = Field(20, ge=0)  # bad keys per client address per window before 429 (0 = off)
    auth_failure_window_s: float = Field(60.0, gt=0)
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed (the reverse proxy's address, comma
    # separated, "*" for any); empty: none, the client is the TCP peer.
    forwarded_allow_ips: str = ""
    metrics_token: SecretStr | None = None  # when set, GET /metrics needs "Authorization: Bearer <token>"

    # --- generation limits ---
    max_new_tokens_cap: int = Field(512, ge=1)
    default_max_new_tokens: int = Field(64, ge=1)
    retrieval_item_chars: int = Field(600, ge=1)  # each retrieved item is clipped to this in the prompt
    profile_max_chars: int = Field(4_000, ge=0)

    # --- history ---
    bm25_cache_users: int = Field(64, ge=0)
    # estimated memory of all cached BM25 indexes (LRU; the newest stays)
    bm25_cache_bytes: int = Field(1024 * 1024 * 1024, ge=0)
    # BM25 indexes a user's most recent N characters (0: all of them)
    retrieval_max_chars: int = Field(16 * 1024 * 1024, ge=0)
    history_max_items_per_user: int = Field(100_000, ge=1)
    history_max_chars_per_user: int = Field(64 * 1024 * 1024, ge=1)  # characters of input + output + metadata JSON

    # --- engine ---
    engine: Literal["builtin", "vllm"] = "builtin"
    batch_max_size: int = Field(16, ge=1)  # rows running at once (builtin: KV lanes)
    batch_window_ms: float = Field(5.0, ge=0)  # an idle engine waits this long for more rows before its first step
    max_batch_tokens: int = Field(512, ge=1)  # tokens per engine step (decode rows + prompt chunks)
    max_model_len: int = Field(2048, ge=2)  # prompt + new tokens of one row (capped by the model's context)
    queue_max: int = Field(256, ge=0)  # queued generate requests in all (full -> 503)
    queue_per_user_max: int = Field(32, ge=0)  # queued per user (full -> 429): one user cannot take the whole queue
    # A user's requests being prepared at once (SQL, retrieval, tokenizing: each holds a worker thread and a DB
    # connection); more wait their turn holding neither, up to queue_per_user_max of them (past it: 429).
    prepare_per_user_max: int = Field(4, ge=1)
    # A user's history writes (appends, profile) at once: each holds a connection and, on SQLite, the one write
    # lock; more wait their turn holding neither, up to queue_per_user_max of them (past it: 429).
    history_writes_per_user_max: int = Field(1, ge=1)
    # While other users wait or run, a user at its share of the running rows (rows / active users) lets the
    # next user's row go first; it still fills rows nobody else can use, and running rows are never preempted.
    fair_share: bool = True
    request_timeout_s: float = Field(120.0, gt=0)
    # HTTP requests in flight per process (middleware.InFlightLimit answers 503 beyond; idle connections do not
    # count). The worker-thread pool is sized above it, so a request holding a DB connection/lock can always
    # get a thread to finish (no deadlock).
    max_concurrency: int = Field(256, ge=1)
    # vLLM engine (OPPU_ENGINE=vllm, the [vllm] extra). Slots and queues come from the settings above.
    vllm_max_lora_rank: int = Field(16, ge=1)  # the largest (user + shared) rank a row may use; vLLM allots it per slot
    vllm_max_cpu_loras: int | None = Field(None, ge=1)  # LoRAs kept in host memory (default: 4 x adapter_slots)
    vllm_kv_cache_gib: float = Field(2.0, gt=0)  # CPU: the KV cache in GiB (VLLM_CPU_KVCACHE_SPACE)
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # CUDA: the share of GPU memory vLLM may take
    vllm_prefix_caching: bool = True

    # --- adapters ---
    adapter_slots: int = Field(16, ge=1)
    adapter_max_rank: int = Field(64, ge=1)
    adapter_target_modules: tuple[str, ...] = ALL_TARGET_MODULES
    adapter_host_budget_bytes: int = Field(512 * 1024 * 1024, ge=0)
    adapter_max_file_bytes: int = Field(256 * 1024 * 1024, ge=1)
    adapter_max_tensors: int = Field(4096, ge=1)
    # per-module LoRA scale alpha/r (rslora: alpha/sqrt(r)); above only yields inf
    adapter_max_scale: float = Field(256.0, gt=0)
    adapter_keep_versions: int = Field(5, ge=1)
    # adapter uploads being received/validated at once (each may need ~2x its size)
    upload_concurrency: int = Field(2, ge=1)
    upload_concurrency_per_user: int = Field(1, ge=1)
    # an upload body must arrive within this (408 after; holds no gate)
    upload_body_timeout_s: float = Field(300.0, gt=0)
    # adapter downloads and exports being sent at once (each streamed from disk)
    download_concurrency: int = Field(8, ge=1)
    download_concurrency_per_user: int = Field(2, ge=1)

    # --- training jobs ---
    job_max_attempts: int = Field(3, ge=1)
    job_stale_after_s: float = Field(60.0, gt=0)  # a running job without a heartbeat for this long is retried
    # A queued job put on the queue this long ago is enqueued again by the worker's reaper (its message may be
    # lost: Redis was down at the enqueue or restarted empty); an attempt still in the queue is not doubled.
    job_requeue_after_s: float = Field(60.0, gt=0)
    job_timeout_s: int = Field(3600, ge=1)
    # Finished jobs (succeeded, failed, cancelled) are deleted this long after they finished (the reaper): their
    # status and the user's export show only those kept; the /metrics mean durations cover them.
    job_keep_s: float = Field(30 * 24 * 3600.0, gt=0)
    # An owner's own data-key rotations (POST /users/{id}/keys/rotate-data-key) at most this often, counted from
    # the last that succeeded (429 with Retry-After before); the admin route is the recovery path, not limited.
    data_key_rotation_interval_s: float = Field(3600.0, ge=0)
    # Stage 2 (a user's LoRA) and stage 1 (the shared task LoRA). Chosen for the default model on dev data
    # only (docs/eval/defaults.md): the paper's 1e-4 barely moves a 135M model in a few dozen steps.
    train_user_epochs: int = Field(1, ge=1)
    train_user_lr: float = Field(3e-3, gt=0)
    train_user_rank: int = Field(8, ge=1)
    train_user_alpha: float = Field(16.0, gt=0)
    train_user_target_modules: tuple[str, ...] = Field(("q_proj", "k_proj", "v_proj", "o_proj"), min_length=1)
    train_user_min_steps: int = Field(12, ge=0)  # small histories repeat epochs until this many optimizer steps
    # LoRA in the last N decoder layers only (0: every layer): the backward pass stops below them. Measured on
    # dev (bench/results/training-top-layers-avx512bf16.json): N=15 of 30 trains ~30% faster, dev MAE +0.021
    # [-0.016, +0.061] (20 users): not the default.
    train_user_top_layers: int = Field(0, ge=0)
    train_shared_epochs: int = Field(1, ge=1)
    train_shared_lr: float = Field(1e-3, gt=0)
    train_shared_min_steps: int = Field(16, ge=0)
    train_shared_max_per_user: int = Field(200, ge=1)
    # Stage 1 learns from at most about this many examples in all, shared among the users with history: the
    # per-user sample alone grew with the number of users (60 x 200 examples ran past the job's timeout).
    train_shared_max_examples: int = Field(4000, ge=1)
    train_retrieval_k: int = Field(1, ge=0)
    # A user's retrain learns from their most recent N items (retrieval still sees every earlier one): without a
    # cap one user's 100k-item history held the job runner for hours (12.5k steps), ahead of everyone's jobs.
    train_max_examples: int = Field(1000, ge=1)
    train_use_profile: bool = True
    train_max_seq_len: int = Field(512, ge=2)
    train_batch_size: int = Field(8, ge=1)
    train_seed: int = 0
    retrain_after_new_items: int | None = Field(None, ge=1)  # auto-retrain once a user has N items past the cutoff
    # When an erased user's history trained the CURRENT shared task LoRA: `flag` only marks the version
    # (`trained_on_erased`; it stays served), `retire` takes it out of service at the erase's commit (the newest
    # kept shared version not trained on an erased user is served instead, or none), `retrain` retires it and
    # enqueues a shared retrain. Default retire: the erasure takes effect at once and costs nothing, while a
    # retrain on every erase would let anyone who can create and erase users keep the trainer busy.
    shared_on_erase: Literal["flag", "retire", "retrain"] = "retire"

    # --- notices (key revoked, user erased, adapter changed) between replicas ---
    # Written to SQL in the transaction that causes them (an outbox) and polled by every replica this often,
    # besides the Redis pub/sub fast path: a notice sent while Redis is down still arrives within this time.
    notice_poll_s: float = Field(2.0, gt=0)  # 0 would poll in a tight loop
    notice_keep_s: float = Field(3600.0, ge=0)  # older notices are deleted (a replica down longer resyncs at start)

    @field_validator("master_key")
    @classmethod
    def _master_key_parses(cls, value: SecretStr | None) -> SecretStr | None:
        """Checked here, not when the keyring is opened (a traceback after the keyring file was made); the
        message never quotes the value."""
        from service.sealing.kek import Keyset  # the format's one owner

        if value is not None and value.get_secret_value():
            try:
                Keyset.parse(value.get_secret_value())
            except Exception:
                raise ValueError("not a master key (base64 of 32 random bytes, or a keyset file's JSON)") from None
        return value

    @model_validator(mode="after")
    def _bounds(self) -> Settings:
        if self.max_new_tokens_cap < 1 or self.default_max_new_tokens > self.max_new_tokens_cap:
            raise ValueError("need 1 <= default_max_new_tokens <= max_new_tokens_cap")
        if self.adapter_slots < 1 or self.batch_max_size < 1:
            raise ValueError("adapter_slots and batch_max_size must be >= 1")
        if self.max_batch_tokens < self.batch_max_size:
            raise ValueError("max_batch_tokens must be >= batch_max_size (one token per running row)")
        if self.queue_per_user_max < MAX_N or self.queue_max < self.queue_per_user_max:
            raise ValueError(
                f"need {MAX_N} <= queue_per_user_max <= queue_max: a request's n (up to {MAX_N}) rows are queued at "
                "once, and one that can never fit is a 429/503 for ever (clients retry it)"
            )
        if self.default_max_new_tokens >= self.max_model_len:
            raise ValueError("max_model_len must be above default_max_new_tokens (a request needs a prompt token)")
        self._check_training_fits_adapter_limits()
        from service.db.session import pool_capacity  # the pool's one owner

        connections = pool_capacity(self.resolved_database_url)
        if self.prepare_per_user_max + self.history_writes_per_user_max > connections // 2:
            raise ValueError(
                f"prepare_per_user_max + history_writes_per_user_max must be <= {connections // 2}: each request "
                "being prepared and each history write holds a database connection, and one user may not hold more "
                f"than half of a process's {connections}"
            )
        if same_database(self.resolved_keyring_url, self.resolved_database_url):
            raise ValueError(
                "OPPU_KEYRING_URL names the database of OPPU_DATABASE_URL: the wrapped data keys would be in every "
                "backup of the data, and an erase would not reach those backups; give the keyring a database of its "
                "own (default: keyring.sqlite3 in OPPU_DATA_DIR)"
            )
        if self.notice_keep_s < self.notice_poll_s + NOTICE_COMMIT_LAG_S:
            raise ValueError(
                f"notice_keep_s must be >= notice_poll_s + {NOTICE_COMMIT_LAG_S:g} s: notices pruned sooner can be "
                "gone before another replica polls them (while Redis pub/sub is down)"
            )
        return self

    def _check_training_fits_adapter_limits(self) -> None:
        """What the server trains must pass the limits it publishes under (else every retrain trains in full,
        is refused at publish and retried)."""
        problems = []
        for stage, targets, rank, alpha in (
            ("train_user", self.train_user_target_modules, self.train_user_rank, self.train_user_alpha),
            ("the shared task LoRA", SHARED_LORA_TARGETS, SHARED_LORA_RANK, SHARED_LORA_ALPHA),
        ):
            outside = sorted(set(targets) - set(self.adapter_target_modules))
            if outside:
                problems.append(f"{stage} targets {outside}, not in adapter_target_modules")
            if rank > self.adapter_max_rank:
                problems.append(f"{stage} rank {rank} is above adapter_max_rank {self.adapter_max_rank}")
            if alpha / rank > self.adapter_max_scale:
                problems.append(f"{stage} scale {alpha / rank:g} is above adapter_max_scale {self.adapter_max_scale:g}")
        if self.engine == "vllm" and self.train_user_rank + SHARED_LORA_RANK > self.vllm_max_lora_rank:
            problems.append(
                f"vllm_max_lora_rank {self.vllm_max_lora_rank} is below train_user_rank + the shared LoRA's rank "
                f"({self.train_user_rank} + {SHARED_LORA_RANK})"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def with_overrides(self, **changes: object) -> Settings:
        """A copy with some fields changed, validated like values from the environment (types coerced,
        bounds checked). `model_copy(update=...)` validates nothing: a str where a SecretStr belongs once
        broke `make serve`; tests/test_architecture.py keeps it out of service/."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'oppu.sqlite3').resolve()}"

    @property
    def resolved_keyring_url(self) -> str:
        if self.keyring_url:
            return self.keyring_url
        return f"sqlite:///{(self.data_dir / 'keyring.sqlite3').resolve()}"

    @property
    def resolved_master_key_file(self) -> Path:
        return self.master_key_file if self.master_key_file is not None else self.data_dir / "master_key"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir if self.model_cache_dir is not None else self.data_dir / "models"


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "")


def same_database(a: str, b: str) -> bool:
    """Whether two database URLs name one database: SQLite, one file (paths resolved against the working
    directory, symlinks followed); a server (PostgreSQL, any driver), one host, port and database name, whatever
    the user or schema (every schema is in the database's dumps). In-memory SQLite is its own database."""
    first, second = _database_identity(a), _database_identity(b)
    return first is not None and first == second


def _database_identity(url: str) -> tuple[str, ...] | None:
    try:
        parsed = make_url(url)
    except Exception:  # not a URL: the engine reports it where it is opened
        return None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = (parsed.database or "").removeprefix("file:")
        if path in ("", ":memory:") or parsed.query.get("mode") == "memory":
            return None
        return (backend, str(Path(path).expanduser().resolve()))
    host = (parsed.host or str(parsed.query.get("host", ""))).lower()
    if host in LOOPBACK_HOSTS or host.startswith("/"):  # this machine's server (TCP or its Unix socket)
        host = "localhost"
    port = parsed.port or str(parsed.query.get("port", "")) or {"postgresql": 5432}.get(backend, "")
    return (backend, host, str(port), parsed.database or parsed.username or "")


def describe_invalid(exc: ValidationError) -> str:
    """A settings error as lines naming the environment variables (OPPU_...), without the input values:
    a bad OPPU_MASTER_KEY must not be echoed to a log."""
    lines = ["invalid settings:"]
    for error in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        where = f"OPPU_{field.upper()}: " if field else ""
        lines.append(f"  {where}{error['msg']}")
    return "\n".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
