"""Bench: what sealing at rest costs (issue 19): generate p50 and history-append p50 through the API, and an
adapter's cold load (disk -> host weights), with and without sealing, on the real default model, in ONE run.

Two servers in this process on the same model, one sealed (the default) and one with OPPU_SEAL_AT_REST=false,
each with its own SQLite database, keyring and store; the same user set up on both (100 history items, a
profile, a random r=8 q/k/v/o LoRA as a retrain makes). Rounds alternate which server goes first, so drift of
a shared box hits both alike. Generate: retrieval k=4 over the history and the profile (both read and opened
per request), 16 new tokens, greedy. Append: one new item per request. Cold load: the store's files read and
parsed into host weights (what the adapter cache does on a miss), for the r=8 adapter (the shape this server
trains; the cold-load target is judged on it) and a 20x larger r=64 one on every module (a stress case, reported
with its overhead in ms); the page cache is warm for both (the cost measured is the decryption, not the disk).

Prints ONE JSON object (and writes it with --out): p50/p90 per server, the overheads in percent, the targets
(generate <= 5 %, cold load <= 10 %) and whether they are met, and the machine record.

    .venv/bin/python bench/sealing.py --out bench/results/sealing.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/sealing.py` from anywhere: bench.* and service.* importable

from fastapi.testclient import TestClient  # noqa: E402
from safetensors.torch import save  # noqa: E402

from bench.machine import machine_record  # noqa: E402
from service.adapters.archive import pack_zip  # noqa: E402
from service.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, make_peft_config, read_adapter_dir  # noqa: E402
from service.adapters.service import serving_ref  # noqa: E402
from service.config import Settings  # noqa: E402
from service.db.migrate import upgrade  # noqa: E402
from service.db.session import unit_of_work  # noqa: E402
from service.main import create_app  # noqa: E402
from service.state import AppState  # noqa: E402

ADMIN = "bench-admin-key-0123456789"
TARGETS = {"generate_p50_overhead_pct": 5.0, "cold_load_p50_overhead_pct": 10.0}


def lora_zip(state: AppState, rank: int, modules: tuple[str, ...], seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for path, (d_in, d_out) in sorted(state.adapters.spec.linear_shapes.items()):
        if path.rsplit(".", 1)[-1] in modules:
            tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.01
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.01
    config = make_peft_config(rank, 2.0 * rank, modules, None)
    return pack_zip({CONFIG_NAME: json.dumps(config).encode(), WEIGHTS_NAME: save(tensors)})


def settings(work: Path, sealed: bool) -> Settings:
    db = work / "db.sqlite3"
    upgrade(f"sqlite:///{db}")
    return Settings(
        data_dir=work / "data",
        database_url=f"sqlite:///{db}",
        adapters_dir=work / "adapters",
        model_cache_dir=REPO / "data" / "models",  # the default model converted once (make serve does it too)
        admin_key=ADMIN,
        seal_at_rest=sealed,
        auth_max_failures=0,
        docs_enabled=False,
    )


class Server:
    def __init__(self, name: str, client: TestClient) -> None:
        self.name, self.client = name, client
        self.state: AppState = client.app.state.oppu  # type: ignore[attr-defined]
        r = client.post("/admin/users", json={"user_id": "u"}, headers={"Authorization": f"Bearer {ADMIN}"})
        self.auth = {"Authorization": f"Bearer {r.json()['api_key']}"}
        items = [
            {
                "id": f"h{i}",
                "input": f"Rate the movie #{i}: Title {i} (19{i % 100:02d}) | Drama|Comedy",
                "output": f"{1 + i % 5}.0",
            }
            for i in range(100)
        ]
        assert client.post("/users/u/history", json={"items": items}, headers=self.auth).status_code == 201
        client.put(
            "/users/u/profile", json={"text": "Likes dramas and old comedies; rates generously."}, headers=self.auth
        )
        self.appended = 0

    def upload(self, archive: bytes) -> None:
        r = self.client.put(
            "/users/u/adapter", content=archive, headers={**self.auth, "Content-Type": "application/zip"}
        )
        assert r.status_code in (200, 201), r.text

    def generate(self) -> float:
        body = {"prompt": "Rate the movie: Heat (1995) | Crime|Drama", "max_new_tokens": 16, "temperature": 0,
                "retrieval_k": 4, "use_profile": True}  # fmt: skip
        t = time.perf_counter()
        r = self.client.post("/users/u/generate", json=body, headers=self.auth)
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    def append(self) -> float:
        self.appended += 1
        body = {"items": [{"id": f"new{self.appended}", "input": "Rate the movie: Alien (1979)", "output": "4.5"}]}
        t = time.perf_counter()
        assert self.client.post("/users/u/history", json=body, headers=self.auth).status_code == 201
        return time.perf_counter() - t

    def cold_load(self) -> float:
        with unit_of_work(self.state.session_factory) as session:
            ref = serving_ref(session, self.state.store, self.storage_key(), self.state.adapters.spec)
        assert ref is not None
        t = time.perf_counter()
        read_adapter_dir(ref.directory, max_scale=256.0, seal=ref.seal)
        return time.perf_counter() - t

    def storage_key(self) -> str:
        from sqlalchemy import select

        from service.db.models import User

        with unit_of_work(self.state.session_factory) as session:
            key = session.scalar(select(User.storage_key).where(User.user_id == "u"))
        assert key is not None
        return key


def measure(servers: list[Server], what: Callable[[Server], float], rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {s.name: [] for s in servers}
    for i in range(rounds):
        for s in servers if i % 2 == 0 else servers[::-1]:
            out[s.name].append(what(s))
    return out


def summary(samples: dict[str, list[float]]) -> dict[str, Any]:
    """p50/p90 per server, the overhead of the p50s, and the median of the per-round ratios (each round runs
    both servers back to back, so a busy moment of the box hits both) with a 95% bootstrap CI over rounds."""

    def q(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]

    out: dict[str, Any] = {
        name: {"p50_ms": round(statistics.median(xs) * 1e3, 3), "p90_ms": round(q(xs, 0.9) * 1e3, 3), "n": len(xs)}
        for name, xs in samples.items()
    }
    out["overhead_pct"] = round(100.0 * (out["sealed"]["p50_ms"] / out["plaintext"]["p50_ms"] - 1.0), 2)
    ratios = [s / p for s, p in zip(samples["sealed"], samples["plaintext"], strict=True)]
    rng = random.Random(0)
    draws = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    out["paired_ratio_median"] = round(statistics.median(ratios), 4)
    out["paired_ratio_ci95"] = [round(draws[50], 4), round(draws[1949], 4)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="requests per server and measure")
    parser.add_argument("--load-rounds", type=int, default=40, help="cold loads per server and adapter")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    record = machine_record()
    results: dict[str, Any] = {"bench": "sealing", "command": " ".join(sys.argv), "machine": record}
    results["load_avg_start"] = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="oppu-bench-sealing-") as tmp:
        work = Path(tmp)
        with (
            TestClient(create_app(settings(work / "sealed", True))) as sealed_client,
            TestClient(create_app(settings(work / "plain", False))) as plain_client,
        ):
            servers = [Server("plaintext", plain_client), Server("sealed", sealed_client)]
            small = lora_zip(servers[0].state, 8, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=1)
            for s in servers:
                s.upload(small)
                for _ in range(3):
                    s.generate()  # warm: engine, caches, the adapter in a slot
            results["generate"] = summary(measure(servers, Server.generate, args.rounds))
            results["history_append"] = summary(measure(servers, Server.append, args.rounds))
            results["cold_load_r8_qkvo"] = summary(measure(servers, Server.cold_load, args.load_rounds))
            big = lora_zip(servers[0].state, 64, tuple(servers[0].state.settings.adapter_target_modules), seed=2)
            for s in servers:
                s.upload(big)
            results["cold_load_r64_all"] = summary(measure(servers, Server.cold_load, args.load_rounds))
            results["adapter_bytes"] = {"r8_qkvo": len(small), "r64_all": len(big)}
    results["load_avg_end"] = list(os.getloadavg())
    results["targets"] = TARGETS
    for name in ("cold_load_r8_qkvo", "cold_load_r64_all"):
        r = results[name]
        r["overhead_ms"] = round(r["sealed"]["p50_ms"] - r["plaintext"]["p50_ms"], 3)
    results["met"] = {
        "generate": results["generate"]["overhead_pct"] <= TARGETS["generate_p50_overhead_pct"],
        # the adapter this server trains (OPPU_TRAIN_USER_* defaults: r=8 on q/k/v/o) is the target's case
        "cold_load": results["cold_load_r8_qkvo"]["overhead_pct"] <= TARGETS["cold_load_p50_overhead_pct"],
        # a 20x larger upload: reported beside it; its plaintext load maps the page cache and copies nothing,
        # the sealed one must decrypt every byte (overhead_ms says what that costs)
        "cold_load_r64_all_stress": results["cold_load_r64_all"]["overhead_pct"]
        <= TARGETS["cold_load_p50_overhead_pct"],
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
