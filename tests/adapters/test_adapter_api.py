"""Adapter routes through HTTP on the tiny model: versions, download -> plain PEFT, rollback, keep-N,
delete, tenancy, and malicious uploads refused while other users' traffic keeps succeeding."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save
from transformers import AutoTokenizer, LlamaForCausalLM

from service import composition
from service.adapters import service as adapter_service
from service.adapters.archive import pack_zip
from service.adapters.peft_format import CONFIG_NAME, PEFT_FILES, WEIGHTS_NAME
from service.adapters.store import AdapterStore
from service.adapters.validation import BaseModelSpec
from service.db.migrate import upgrade
from service.db.models import SHARED_OWNER
from service.db.session import unit_of_work
from service.errors import Unprocessable
from tests.conftest import admin_headers, app_state, bearer, builtin_engine, create_user, make_settings, running_app
from tests.factories import ALL, greedy, lora_zip, make_lora, new_user, peft_files, peft_model, storage_key, upload
from tests.models import load_base, reference_text, tiny_llama_config

# --- fixtures of this module ---
MAX_FILE_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def base(tiny_model_path: Path) -> Any:
    return load_base(tiny_model_path)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def loras(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": make_lora(base, root / "a", seed=1, r=8, targets=ALL),
        "b": make_lora(base, root / "b", seed=2, r=4, targets=("q_proj", "v_proj", "down_proj")),
        "c": make_lora(base, root / "c", seed=3, r=2, targets=("k_proj", "o_proj", "up_proj")),
    }


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("api")
    with running_app(tmp, tiny_model_path, adapter_keep_versions=2, adapter_max_file_bytes=MAX_FILE_BYTES) as c:
        yield c


def _generate(client: TestClient, user: str, key: str, prompt: str, n: int = 8) -> dict[str, Any]:
    r = client.post(f"/users/{user}/generate", json=greedy(prompt, n), headers=bearer(key))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# --- tests ---
def test_versions_download_rollback_prune_delete(
    client: TestClient, base: Any, tokenizer: Any, loras: dict[str, Path], tmp_path: Path
) -> None:
    key = create_user(client, "ann")
    auth = bearer(key)
    store = app_state(client).store
    skey = storage_key(client, "ann")
    r = client.get("/users/ann/adapter", headers=auth)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert client.get("/users/ann/adapter/download", headers=auth).status_code == 404
    assert client.get("/users/ann/adapter/versions", headers=auth).json() == {"current_version": None, "versions": []}
    base_text = _generate(client, "ann", key, "Tell me about zebras.")
    assert base_text["adapter_version"] is None

    r = upload(client, "ann", key, lora_zip(loras["a"]))
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["version"] == 1 and meta["current"] is True and meta["source"] == "imported"
    assert meta["rank"] == 8 and meta["alpha"] == 16 and meta["target_modules"] == sorted(ALL)
    assert meta["base_model"] == "tiny-llama-v1"
    assert meta["nbytes"] == (loras["a"] / WEIGHTS_NAME).stat().st_size
    assert meta["sha256"] == hashlib.sha256((loras["a"] / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert client.get("/users/ann/adapter", headers=auth).json() == meta
    assert sorted(p.name for p in store.version_dir(skey, 1).iterdir()) == sorted(PEFT_FILES)

    # Acceptance 4: the downloaded zip loads in plain PEFT and reproduces the service's greedy output.
    served = _generate(client, "ann", key, "Tell me about zebras.", n=16)
    assert served["adapter_version"] == 1
    r = client.get("/users/ann/adapter/download", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    out = tmp_path / "downloaded"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert sorted(zf.namelist()) == sorted(PEFT_FILES)
        zf.extractall(out)
    text, n_tokens = reference_text(peft_model(base, out), tokenizer, "Tell me about zebras.", 16)
    assert served["text"] == text and served["usage"]["completion_tokens"] == n_tokens
    assert served["text"] != base_text["text"]  # the adapter visibly changes the output

    # A second upload becomes current; rollback (admin only) makes v1 serve again.
    r = upload(client, "ann", key, lora_zip(loras["b"]))
    assert r.status_code == 201 and r.json()["version"] == 2
    v2 = _generate(client, "ann", key, "Tell me about zebras.", n=16)
    assert v2["adapter_version"] == 2 and v2["text"] != served["text"]
    listing = client.get("/users/ann/adapter/versions", headers=auth).json()
    assert listing["current_version"] == 2
    assert [(v["version"], v["current"]) for v in listing["versions"]] == [(2, True), (1, False)]
    assert client.post("/admin/users/ann/adapter/rollback", json={"version": 1}, headers=auth).status_code == 403
    r = client.post("/admin/users/ann/adapter/rollback", json={"version": 7}, headers=admin_headers())
    assert r.status_code == 404
    r = client.post("/admin/users/ann/adapter/rollback", json={"version": 1}, headers=admin_headers())
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["current"] is True
    back = _generate(client, "ann", key, "Tell me about zebras.", n=16)
    assert back["adapter_version"] == 1 and back["text"] == served["text"]
    r = client.get("/users/ann/adapter/download", params={"version": 2}, headers=auth)
    assert r.status_code == 200 and "v2" in r.headers["content-disposition"]

    # keep-N (2): a third version prunes v1 from SQL and from disk.
    r = upload(client, "ann", key, lora_zip(loras["c"]))
    assert r.status_code == 201 and r.json()["version"] == 3
    listing = client.get("/users/ann/adapter/versions", headers=auth).json()
    assert [v["version"] for v in listing["versions"]] == [3, 2] and listing["current_version"] == 3
    assert store.list_versions(skey) == [2, 3]
    assert not store.version_dir(skey, 1).exists()
    assert client.get("/users/ann/adapter/download", params={"version": 1}, headers=auth).status_code == 404
    assert _generate(client, "ann", key, "hi")["adapter_version"] == 3

    # DELETE removes every version (rows and files); generation falls back to the base.
    assert client.delete("/users/ann/adapter", headers=auth).status_code == 204
    assert client.get("/users/ann/adapter", headers=auth).status_code == 404
    assert client.delete("/users/ann/adapter", headers=auth).status_code == 404
    assert not store.key_dir(skey).exists()
    after = _generate(client, "ann", key, "Tell me about zebras.")
    assert after["adapter_version"] is None and after["text"] == base_text["text"]
    assert not any(k.owner_key == skey for k in builtin_engine(client).cache.slot_keys())

    # A new upload after the delete never reuses a version number.
    r = upload(client, "ann", key, lora_zip(loras["a"]))
    assert r.status_code == 201 and r.json()["version"] == 4


def test_deleting_user_removes_adapter_files(client: TestClient, loras: dict[str, Path]) -> None:
    key = create_user(client, "gone")
    skey = storage_key(client, "gone")
    assert upload(client, "gone", key, lora_zip(loras["b"])).status_code == 201
    assert _generate(client, "gone", key, "hi", n=2)["adapter_version"] == 1
    store, cache = app_state(client).store, builtin_engine(client).cache
    assert store.version_dir(skey, 1).is_dir()
    assert client.delete("/admin/users/gone", headers=admin_headers()).status_code == 204
    assert not store.key_dir(skey).exists()
    assert not any(k.owner_key == skey for k in [*cache.slot_keys(), *cache.host_keys()])
    assert client.get("/users/gone/adapter", headers=bearer(key)).status_code == 401


def test_other_users_keys_are_forbidden(client: TestClient, loras: dict[str, Path]) -> None:
    owner = create_user(client, "owner")
    intruder = bearer(create_user(client, "intruder"))
    assert upload(client, "owner", owner, lora_zip(loras["a"])).status_code == 201
    answers = [
        client.get("/users/owner/adapter", headers=intruder),
        client.get("/users/owner/adapter/versions", headers=intruder),
        client.get("/users/owner/adapter/download", headers=intruder),
        client.put(
            "/users/owner/adapter",
            content=lora_zip(loras["b"]),
            headers={**intruder, "Content-Type": "application/zip"},
        ),
        client.delete("/users/owner/adapter", headers=intruder),
        client.post("/admin/users/owner/adapter/rollback", json={"version": 1}, headers=intruder),
    ]
    assert [a.status_code for a in answers] == [403] * len(answers), [a.text for a in answers]
    assert all(a.json()["code"] == "forbidden" for a in answers)
    assert client.get("/users/owner/adapter/versions", headers=bearer(owner)).json()["current_version"] == 1
    assert client.get("/users/owner/adapter").status_code == 401


# --- malicious / broken uploads ---
def _with_weights(adapter_dir: Path, weights: bytes) -> bytes:
    return pack_zip({CONFIG_NAME: (adapter_dir / CONFIG_NAME).read_bytes(), WEIGHTS_NAME: weights})


def _with_config(adapter_dir: Path, **changes: Any) -> bytes:
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    config.update(changes)
    return pack_zip({CONFIG_NAME: json.dumps(config).encode(), WEIGHTS_NAME: (adapter_dir / WEIGHTS_NAME).read_bytes()})


def _raw_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class _Unseekable(io.RawIOBase):
    """A write-only stream without seek: zipfile streams members with data descriptors (as zip tools do)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.buf += bytes(b)
        return len(b)


def _zip_bomb(adapter_dir: Path, size: int, *, noise: int = 0) -> bytes:
    """Stream-compressed: `size` bytes of zeros (with `noise` random bytes per KiB to lower the ratio)."""
    out = _Unseekable()
    gen = torch.Generator().manual_seed(0)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(CONFIG_NAME, (adapter_dir / CONFIG_NAME).read_bytes())
        with zf.open(WEIGHTS_NAME, "w", force_zip64=True) as member:
            for _ in range(size >> 20):
                chunk = torch.zeros(1024, 1024, dtype=torch.uint8)
                chunk[:, :noise] = torch.randint(0, 256, (1024, noise), dtype=torch.uint8, generator=gen)
                member.write(chunk.numpy().tobytes())
    return bytes(out.buf)


def _bad_uploads(base: Any, good: Path, root: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (request body, a fragment the error message must contain)."""
    weights = (good / WEIGHTS_NAME).read_bytes()
    tensors = load_file(str(good / WEIGHTS_NAME))
    nan = dict(tensors)
    first = sorted(nan)[0]
    nan[first] = nan[first].clone()
    nan[first][0, 0] = float("nan")
    nan_path = root / "nan.safetensors"
    save_file(nan, str(nan_path))
    legacy_pickle = io.BytesIO()
    torch.save(tensors, legacy_pickle, _use_new_zipfile_serialization=False)
    other_cfg: Any = tiny_llama_config()
    other_cfg.hidden_size, other_cfg.intermediate_size = 32, 64
    other = LlamaForCausalLM(other_cfg)
    return {
        "pickle renamed .safetensors": (_with_weights(good, pickle.dumps({"w": [1.0, 2.0]})), "pickle"),
        "torch.save renamed .safetensors": (_with_weights(good, legacy_pickle.getvalue()), "safetensors"),
        "truncated safetensors": (_with_weights(good, weights[: len(weights) // 2]), "outside the file"),
        "NaN weights": (_with_weights(good, nan_path.read_bytes()), "NaN"),
        "rank 1024": (lora_zip(make_lora(base, root / "r1024", seed=4, r=1024, targets=("q_proj",))), "1024"),
        "other architecture": (
            lora_zip(make_lora(other, root / "other", seed=5, r=4, targets=("q_proj", "v_proj"))),
            "do not fit the base model",
        ),
        "other base model name": (
            _with_config(good, base_model_name_or_path="meta-llama/Llama-2-7b-hf"),
            "Llama-2-7b-hf",
        ),
        "unknown target module": (
            lora_zip(
                make_lora(
                    base, root / "head", seed=6, r=4, targets=("lm_head",), save_kw={"save_embedding_layers": False}
                )
            ),
            "lm_head",
        ),
        "parent path in zip": (_raw_zip({f"../{CONFIG_NAME}": b"{}", WEIGHTS_NAME: weights}), ".."),
        "absolute path in zip": (_raw_zip({f"/tmp/{CONFIG_NAME}": b"{}", WEIGHTS_NAME: weights}), "absolute"),
        "nested path in zip": (_raw_zip({f"a/b/{CONFIG_NAME}": b"{}", WEIGHTS_NAME: weights}), "directory"),
        "zip bomb": (_zip_bomb(good, 64 << 20), "compression ratio"),
        "zip bomb under the ratio cap": (_zip_bomb(good, 8 << 20, noise=16), "more than"),
        "missing weights": (_raw_zip({CONFIG_NAME: (good / CONFIG_NAME).read_bytes()}), WEIGHTS_NAME),
        "not a zip": (b"this is not a zip archive at all", "zip"),
        "empty body": (b"", "zip"),
    }


# The hostile "lm_head" adapter below makes PEFT warn about the tied embedding it targets: that is the point.
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning")
def test_malicious_uploads_are_refused_while_traffic_succeeds(
    client: TestClient, base: Any, loras: dict[str, Path], tmp_path: Path
) -> None:
    good_key = create_user(client, "busy")
    assert upload(client, "busy", good_key, lora_zip(loras["b"])).status_code == 201
    key = create_user(client, "mallory")
    skey = storage_key(client, "mallory")
    bad = _bad_uploads(base, loras["a"], tmp_path)

    stop, statuses = threading.Event(), []

    def traffic() -> None:
        while not stop.is_set():
            r = client.post("/users/busy/generate", json=greedy("keep going", 4), headers=bearer(good_key))
            statuses.append((r.status_code, r.json().get("adapter_version")))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        for name, (body, fragment) in bad.items():
            r = upload(client, "mallory", key, body)
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            err = r.json()
            assert set(err) >= {"code", "message"}, (name, err)
            assert fragment in err["message"], (name, err["message"])
        deadline = time.monotonic() + 30
        while len(statuses) < 3 and time.monotonic() < deadline:  # the refusals can outpace the traffic
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert len(statuses) >= 3
    assert statuses == [(200, 1)] * len(statuses)
    # Nothing of the refused uploads was kept: no version, no files, no temp leftovers.
    assert client.get("/users/mallory/adapter", headers=bearer(key)).status_code == 404
    store = app_state(client).store
    assert store.list_versions(skey) == []
    assert list((store.root / "tmp").iterdir()) == []
    # The same user can still upload a good adapter, which gets version 1.
    r = upload(client, "mallory", key, lora_zip(loras["c"]))
    assert r.status_code == 201 and r.json()["version"] == 1


def test_upload_over_the_body_cap_is_413(client: TestClient) -> None:
    key = create_user(client, "big")
    r = upload(client, "big", key, bytes(MAX_FILE_BYTES + (2 << 20)))
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"


def _targz_of_folder(folder: Path, *, nested: bool) -> bytes:
    """The folder save_pretrained wrote (README.md included), as `tar czf` makes it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, arcname=folder.name if nested else ".")
    return buf.getvalue()


@pytest.mark.parametrize("nested", [True, False])
def test_targz_upload_serves_the_same_tokens_as_the_zip(
    client: TestClient, loras: dict[str, Path], nested: bool
) -> None:
    assert (loras["a"] / "README.md").is_file()  # what save_pretrained leaves beside the PEFT pair
    users = {kind: f"tgz-{kind}-{nested}" for kind in ("zip", "tar")}
    keys = {kind: create_user(client, user) for kind, user in users.items()}
    uploads = {"zip": lora_zip(loras["a"]), "tar": _targz_of_folder(loras["a"], nested=nested)}
    for kind, data in uploads.items():
        r = upload(client, users[kind], keys[kind], data)
        assert r.status_code == 201, r.text
    meta = {k: client.get(f"/users/{u}/adapter", headers=bearer(keys[k])).json() for k, u in users.items()}
    assert meta["zip"]["sha256"] == meta["tar"]["sha256"]
    texts = {k: _generate(client, u, keys[k], "Tell me about zebras.", n=8)["text"] for k, u in users.items()}
    assert texts["zip"] == texts["tar"]


def test_a_version_published_while_a_delete_removes_files_keeps_its_files(
    client: TestClient, loras: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload (or a retrain's publish) commits v2 between the DELETE's commit and its removal of files:
    the delete removes v1's files only; v2 is current and serves, downloads."""
    key = create_user(client, "delia")
    auth = bearer(key)
    assert upload(client, "delia", key, lora_zip(loras["a"])).status_code == 201
    store = app_state(client).store
    real_remove = type(store)._remove
    published: list[int] = []

    def publish_first(self: Any, path: Path) -> bool:  # the store's one removal of files (versions, folders)
        if not published:
            r = upload(client, "delia", key, lora_zip(loras["b"]))
            assert r.status_code == 201, r.text
            published.append(r.json()["version"])
        return bool(real_remove(self, path))

    monkeypatch.setattr(type(store), "_remove", publish_first)
    assert client.delete("/users/delia/adapter", headers=auth).status_code == 204
    monkeypatch.undo()
    assert published == [2]
    skey = storage_key(client, "delia")
    assert not store.exists(skey, 1) and store.exists(skey, 2)
    assert client.get("/users/delia/adapter", headers=auth).json()["version"] == 2
    assert client.get("/users/delia/adapter/download", headers=auth).status_code == 200
    r = client.post("/users/delia/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers=auth)
    assert r.status_code == 200, r.text


# --- uploads that used to cost a server dearly, answer 500, or be accepted and never served ---
def _hostile_header_zip(adapter_dir: Path, size: int) -> bytes:
    """The reproduced upload: a safetensors file whose header is {"__metadata__": ["<noise>", {}, {}, ...]} of
    `size` bytes, zipped (~98 KB for 16 MiB: the noise keeps it under the compression-ratio cap)."""
    noise = json.dumps(base64.b64encode(os.urandom(75_000)).decode())
    header = f'{{"__metadata__": [{noise}{",{}" * ((size - len(noise) - 24) // 3)}]}}'.encode()
    header += b" " * (-len(header) % 8)
    return _with_weights(adapter_dir, struct.pack("<Q", len(header)) + header)


def test_a_16_mib_header_of_empty_objects_is_refused_on_its_length(
    loras: dict[str, Path], tiny_model_path: Path, tmp_path: Path
) -> None:
    # ~13 s of CPU and 1.1 GB (json's 5 M dicts, then a walk over them) before its 422, holding one of the
    # server's upload slots; refused now on the header's length, before it is parsed.
    body = _hostile_header_zip(loras["a"], 16 * 1024 * 1024)
    assert len(body) < 200_000
    with running_app(tmp_path, tiny_model_path) as app:  # the default upload caps (256 MiB a file)
        key = create_user(app, "mallory")
        r = upload(app, "mallory", key, body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["code"] == "invalid_request"
    assert f"{WEIGHTS_NAME}: safetensors header of 16777216 bytes is above the cap of 2162688" in err["message"]


def _many_bad_names(adapter_dir: Path) -> bytes:
    """1500 tensors named by 1200 random characters each: 1500 problems, each naming its tensor."""
    rng = torch.Generator().manual_seed(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_"
    picks = torch.randint(0, len(alphabet), (1500, 1200), generator=rng).tolist()
    tensors = {"".join(alphabet[i] for i in row): torch.zeros(1) for row in picks}
    return _with_weights(adapter_dir, st_save(tensors))


def _b_overflowing_fp32_slots(adapter_dir: Path, tmp_path: Path) -> bytes:
    """One lora_B value that is finite in fp32 once scaled (3.4e38 < 3.4028e38) but inside the slots' margin."""
    tensors = load_file(str(adapter_dir / WEIGHTS_NAME))
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = 3.4e38 / 2.0  # the adapter's scale: lora_alpha 2r / r
    save_file(tensors, str(tmp_path / "overflow.safetensors"))
    return _with_weights(adapter_dir, (tmp_path / "overflow.safetensors").read_bytes())


HOSTILE_UPLOADS: dict[str, tuple[Callable[[Path, Path], bytes], str]] = {
    # were 500s (OverflowError)
    "lora_alpha beyond float": (lambda good, _: _with_config(good, lora_alpha=10**400), "must be a number > 0"),
    "alpha_pattern beyond float": (lambda good, _: _with_config(good, alpha_pattern={"q_proj": 10**400}), "alpha > 0"),
    # was a 3.8 MB answer: every problem, every name in full
    "1500 bad tensor names": (lambda good, _: _many_bad_names(good), "and 1480 more"),
    # was 201, then every generate 503 adapter_unavailable (the slot refused it at every load)
    "overflows the served dtype": (_b_overflowing_fp32_slots, "overflow torch.float32"),
}


@pytest.mark.parametrize("case", list(HOSTILE_UPLOADS))
def test_hostile_uploads_are_short_422s(client: TestClient, loras: dict[str, Path], tmp_path: Path, case: str) -> None:
    make, fragment = HOSTILE_UPLOADS[case]
    user = f"hostile-{list(HOSTILE_UPLOADS).index(case)}"
    key = create_user(client, user)
    r = upload(client, user, key, make(loras["a"], tmp_path))
    assert r.status_code == 422, r.text[:2000]
    err = r.json()
    assert err["code"] == "invalid_request" and fragment in err["message"], err["message"][:2000]
    assert len(r.content) < 16_000 and len(err["details"]) <= 21, len(r.content)
    assert client.get(f"/users/{user}/adapter", headers=bearer(key)).status_code == 404


def test_on_vllm_an_upload_above_the_rank_the_shared_lora_leaves_is_422(
    base: Any, tiny_model_path: Path, tmp_path: Path
) -> None:
    # vLLM serves a user's adapter and the shared task LoRA (rank 8) as ONE LoRA of at most
    # OPPU_VLLM_MAX_LORA_RANK: a rank-16 upload under the default 16 was accepted (201) and never served.
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    settings = make_settings(tmp_path, url, str(tiny_model_path), engine="vllm")
    db = composition.database(settings)
    store = AdapterStore(settings.adapters_dir, composition.sealer_of(db))
    ctx = composition.adapter_context(settings, store, BaseModelSpec.from_model(base, tiny_model_path.name))
    user, _ = new_user(db, "vic")
    r16, r8 = (make_lora(base, tmp_path / f"r{r}", seed=r, r=r, targets=("q_proj", "v_proj")) for r in (16, 8))
    refused = pytest.raises(Unprocessable, match=r"rank r=16 must be an integer in 1\.\.8")
    with refused, unit_of_work(db.session_factory) as session:
        adapter_service.upload(session, ctx, user.storage_key, user.pk, lora_zip(r16))
    with unit_of_work(db.session_factory) as session:
        assert adapter_service.upload(session, ctx, user.storage_key, user.pk, lora_zip(r8)).version == 1
        # the shared task LoRA is held to its own limit (it is the other part of the sum)
        adapter_service.publish(session, ctx, SHARED_OWNER, None, peft_files(r8), source="trained")
    db.dispose()


def test_a_rollback_racing_the_users_erase_is_404_not_500(
    tmp_path: Path, db_url: str, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The erase commits between the rollback's read of the version and its head lock: the head's insert met no
    user (IntegrityError, a 500 `internal_error`); the user is gone, as an upload racing an erase answers."""
    from sqlalchemy import delete

    from service.adapters import repository as adapter_repo
    from service.db.models import User
    from tests.factories import random_lora_zip

    with running_app(tmp_path, tiny_model_path, db_url) as client:
        state = app_state(client)
        key = create_user(client, "ann")
        r = upload(client, "ann", key, random_lora_zip(state.adapters.spec.linear_shapes, None, seed=1))
        assert r.status_code == 201, r.text
        real_ensure_head = adapter_repo.ensure_head

        def erase_first(*args: Any, **kwargs: Any) -> Any:
            with unit_of_work(state.session_factory) as other:  # another request's erase, committed now
                other.execute(delete(User).where(User.user_id == "ann"))
            return real_ensure_head(*args, **kwargs)

        monkeypatch.setattr(adapter_repo, "ensure_head", erase_first)
        r = client.post("/admin/users/ann/adapter/rollback", json={"version": 1}, headers=admin_headers())
        assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
