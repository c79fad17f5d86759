"""Test factories shared by test modules (test modules never import from each other; tests/test_architecture.py
checks it): small fakes of service collaborators, SQLite databases, PEFT adapters and archives, and helpers that
drive a running app over HTTP. Each fake implements only what the code under test uses, and says so."""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import shutil
import socket
import tarfile
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save
from sqlalchemy import select

from service import users
from service.adapters.archive import pack_zip
from service.adapters.peft_format import CONFIG_NAME, PEFT_FILES, WEIGHTS_NAME, make_peft_config
from service.db.migrate import upgrade
from service.db.models import User
from service.db.session import Database, unit_of_work
from service.engine.base import EngineLimits
from service.engine.types import (
    AdapterRef,
    EngineEvent,
    EngineRequest,
    EngineStats,
    Finished,
    FinishReason,
    TokenEvent,
    TokenLogprob,
)
from service.inference.tokens import PromptCodec
from service.sealing.kek import LocalKeyset
from service.sealing.models import KeyringBase
from service.sealing.service import Sealer
from service.tenancy import UserRef
from tests.conftest import REDIS_URL, admin_headers, app_state, bearer

if TYPE_CHECKING:  # as in starlette.testclient: at run time it falls back to httpx when httpx2 is missing
    import httpx2


@dataclass(frozen=True)
class Item:
    """A history item as retrieval and the prompt builder see it (training examples, prompts)."""

    id: str
    input: str | None
    output: str
    kind: str | None = None


class FakeCodec(PromptCodec):
    """A byte-level stand-in for the served tokenizer, with no model files: token id b < 256 is the byte b
    (so one non-ASCII character spans several tokens, as with the real byte-level BPE), EOS ends a turn (the
    only stop token), BOS starts every encoded prompt. Decoding replaces an incomplete UTF-8 sequence with
    U+FFFD, as Hugging Face tokenizers do. Implements what the request path uses: encode_text, encode_chat,
    encode_continuation, decode, token_bytes (token_text follows), stop_ids, vocab_size."""

    EOS = 256
    BOS = 257

    def __init__(self, vocab_size: int = 300) -> None:  # no super().__init__: there is no tokenizer
        self.tokenizer = None
        self.stop_ids = frozenset({self.EOS})
        self.vocab_size = vocab_size

    @staticmethod
    def ids(text: str) -> list[int]:
        """The tokens of `text` with nothing added (one per UTF-8 byte)."""
        return list(text.encode("utf-8"))

    def encode_text(self, text: str) -> list[int]:
        return [self.BOS, *self.ids(text)]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        turns = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return [self.BOS, *self.ids(turns + "<assistant>")]

    def encode_continuation(self, text: str) -> list[int]:
        return self.ids(text)

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if token_id == self.EOS:
            return b"<eos>"
        if token_id == self.BOS:
            return b"<bos>"
        return bytes([token_id]) if token_id < 256 else b""


class FakeEngine:
    """An engine that offers `limits` and `model_name` and records every other use in `calls` (so a test can
    assert that something had no engine effects). `stream` plays `reply`: one token per UTF-8 byte (FakeCodec's
    ids), each with logprob -0.5 and, when asked for, top logprobs, then Finished(`finish`); its requests are
    kept in `requests`."""

    def __init__(self, limits: EngineLimits, reply: str = "", finish: FinishReason = "stop") -> None:
        self._limits = limits
        self._reply = FakeCodec.ids(reply)
        self._finish: FinishReason = finish
        self.calls: list[str] = []
        self.requests: list[EngineRequest] = []
        self.on_reject: list[Callable[[str], None]] = []

    @property
    def model_name(self) -> str:
        return "fake-base"

    @property
    def limits(self) -> EngineLimits:
        return self._limits

    @property
    def context_length(self) -> int:
        self.calls.append("context_length")
        return self._limits.context_length

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")

    async def stream(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        self.calls.append("stream")
        self.requests.append(request)
        k = request.sampling.logprobs
        tokens = self._reply[: request.sampling.max_new_tokens]
        for t in tokens:
            top = tuple(TokenLogprob(t + i, -0.5 - i) for i in range(k or 0))
            yield TokenEvent(t, -0.5 if k is not None else None, top)
        finish = self._finish if len(tokens) == len(self._reply) else "length"
        yield Finished(finish, len(request.prompt_ids))

    def check_room(self, tenant: str, rows: int) -> None:
        """Always room: a check changes nothing, so it is not recorded in `calls` (preparing has no effects)."""

    def cancel_tenant(self, tenant: str, error: BaseException) -> int:
        self.calls.append("cancel_tenant")
        return 0

    def use_shared(self, adapter: AdapterRef | None, read_at: float | None = None) -> None:
        self.calls.append("use_shared")

    def drop_owner(self, owner_key: str) -> None:
        self.calls.append("drop_owner")

    def stats(self) -> EngineStats:
        self.calls.append("stats")
        return EngineStats(0, 0, 0, 0, 0)

    def __getattr__(self, name: str) -> Any:  # an engine method added later (prefetch, ...): recorded too
        if name.startswith("__"):  # copy, pickle and friends probe for these: not engine use
            raise AttributeError(name)
        self.calls.append(name)
        return lambda *args, **kwargs: None


def migrated_sqlite(folder: Path) -> Path:
    """A migrated SQLite database file in `folder`: a template for `sqlite_copy` (migrating takes ~0.5 s,
    copying the file a few ms), e.g. in a module-scoped fixture."""
    path = folder / "template.sqlite3"
    upgrade(f"sqlite:///{path}")
    return path


def sqlite_copy(template: Path, folder: Path) -> Database:
    """A fresh database for one test: a copy of a migrated template, opened as the app opens it (WAL, foreign
    keys). Dispose of `.engine` at the end."""
    path = folder / "db.sqlite3"
    shutil.copyfile(template, path)
    return Database.open(f"sqlite:///{path}")


def new_user(db: Database, user_id: str) -> tuple[UserRef, str]:
    """A user created as the admin API creates one (service/users.py, one unit of work): its ref and API key."""
    with unit_of_work(db.session_factory) as session:
        return users.create_user(session, user_id)


# --- PEFT adapters (random LoRAs saved by PEFT, as users upload them) ---
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every Llama Linear


def make_lora(
    base: Any, out: Path, *, seed: int, r: int, targets: Sequence[str], b_scale: float = 6.0, save_kw: Any = None
) -> Path:
    """A random PEFT LoRA on a copy of `base` (lora_B scaled up so greedy outputs visibly change)."""
    from peft import LoraConfig, get_peft_model  # PEFT is slow to import: only the tests that build adapters

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    model.save_pretrained(out, **(save_kw or {}))
    return out


def make_adapter(
    base: Any,
    out: Path,
    *,
    seed: int,
    r: int,
    targets: Sequence[str],
    rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    b_scale: float = 2.0,
) -> Path:
    """A random PEFT LoRA (B non-zero and scaled up so it visibly changes outputs), saved by PEFT; with rsLoRA
    and rank/alpha patterns (the slot and engine tests)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        use_rslora=rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        init_lora_weights=False,
    )
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    model.save_pretrained(out)
    return out


def peft_model(base: Any, adapter_dir: Path) -> Any:
    """`base` (copied) with the adapter applied by PEFT: the reference the server's outputs are checked against."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()


def peft_files(adapter_dir: Path) -> dict[str, bytes]:
    return {name: (adapter_dir / name).read_bytes() for name in sorted(PEFT_FILES)}


def lora_zip(adapter_dir: Path) -> bytes:
    return pack_zip(peft_files(adapter_dir))


def random_lora_zip(
    linear_shapes: Mapping[str, tuple[int, int]],
    base_model_name: str | None,
    seed: int,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 0.1,
) -> bytes:
    """A valid random PEFT LoRA (zip upload) built with torch directly (no PEFT model needed; bench/soak.py uses
    it too) for a base model with these Linear shapes (path -> d_in, d_out), e.g. ``BaseModelSpec.linear_shapes``;
    base_model_name None skips the server's base-name check."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for path, (d_in, d_out) in sorted(linear_shapes.items()):
        if path.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * scale
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * scale
    config = make_peft_config(rank, 2.0 * rank, targets, base_model_name)
    return pack_zip({CONFIG_NAME: json.dumps(config).encode(), WEIGHTS_NAME: save(tensors)})


# --- archives that cost more than they weigh (issue 23 N1) ---
GIB = 1 << 30


def _octal(n: int, width: int) -> bytes:
    return b"%0*o" % (width - 1, n) + b"\0"


def gnu_sparse_member(name: str, realsize: int) -> bytes:
    """A GNU sparse ('S') header: `realsize` bytes that are all hole, no data stored (tarfile would fill the
    hole with NULs in memory without reading the stream, so no stream cap sees it)."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT)[:512])
    block[386:398] = _octal(realsize, 12)  # sparse map: one empty data block at the end of the file
    block[398:410] = _octal(0, 12)
    block[483:495] = _octal(realsize, 12)  # the real size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def sparse_bomb(realsize: int = GIB) -> bytes:
    """~90 bytes of .tar.gz declaring a `realsize` file."""
    return gzip.compress(gnu_sparse_member("adapter_model.safetensors", realsize) + bytes(1024), 9, mtime=0)


def pax_sparse_bomb(realsize: int = GIB) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.pax_headers = {"GNU.sparse.map": f"{realsize},0", "GNU.sparse.realsize": str(realsize)}
        tf.addfile(info)
    return gzip.compress(buf.getvalue(), 9, mtime=0)


# --- HTTP calls of a running app (TestClient) ---
# TestClient is typed as an httpx2.Client (starlette's testclient), so its responses are httpx2 Responses.
def upload(client: TestClient, user: str, key: str, data: bytes) -> httpx2.Response:
    headers = {**bearer(key), "Content-Type": "application/zip"}
    return client.put(f"/users/{user}/adapter", content=data, headers=headers)


def greedy(prompt: str, n: int, **extra: Any) -> dict[str, Any]:
    """A generate body whose prompt is exactly `prompt` (no retrieval, no profile), greedy."""
    return {"prompt": prompt, "max_new_tokens": n, "temperature": 0, "retrieval_k": 0, "use_profile": False, **extra}


def storage_key(client: TestClient, user_id: str) -> str:
    state = app_state(client)
    with unit_of_work(state.session_factory) as session:
        key = session.scalar(select(User.storage_key).where(User.user_id == user_id))
    assert key is not None
    return key


def wait_job(client: TestClient, job_id: str, timeout: float = 120.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, object] = client.get(f"/admin/jobs/{job_id}", headers=admin_headers()).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def add_history(client: TestClient, user: str, key: str, n: int = 6) -> None:
    items = [{"id": f"i{i}", "input": f"question {i}", "output": f"answer number {i} zebracorn"} for i in range(n)]
    r = client.post(f"/users/{user}/history", json={"items": items}, headers=bearer(key))
    assert r.status_code == 201, r.text


class PromptRecorder:
    """Wraps the prompt encoders of the one preparation step to see every prompt the model is given."""

    ENCODERS = ("encode_chat", "encode_text")

    def __init__(self, client: TestClient) -> None:
        self.runtime = client.app.state.oppu.preparer.codec  # type: ignore[attr-defined]
        self.originals = {n: getattr(self.runtime, n) for n in self.ENCODERS}
        self.prompts: list[str] = []

    def __enter__(self) -> PromptRecorder:
        for name, original in self.originals.items():
            setattr(self.runtime, name, self._recording(original))
        return self

    def _recording(self, original: Any) -> Any:
        def encode(prompt: Any, *args: Any, **kwargs: Any) -> Any:
            self.prompts.append(json.dumps(prompt) if not isinstance(prompt, str) else prompt)
            return original(prompt, *args, **kwargs)

        return encode

    def __exit__(self, *exc: object) -> None:
        for name in self.originals:
            delattr(self.runtime, name)  # back to the class's method


# --- Prometheus pages and processes ---
Samples = dict[str, list[tuple[dict[str, str], float]]]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text page, by sample name: [(labels, value)]."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_url(db: int) -> str:
    """The test Redis server's URL with database number `db`."""
    parts = urlsplit(REDIS_URL)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def make_sealer(folder: Path, *, enabled: bool = True) -> Sealer:
    """A sealer on a fresh SQLite keyring in `folder` under a fresh master key (what composition builds)."""
    folder.mkdir(parents=True, exist_ok=True)
    keyring = Database.open(f"sqlite:///{folder / 'keyring.sqlite3'}")
    KeyringBase.metadata.create_all(keyring.engine)
    return Sealer(keyring.session_factory, LocalKeyset(inline=os.urandom(32)), enabled=enabled)
