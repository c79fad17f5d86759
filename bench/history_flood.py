"""Bench: other users' history appends while one user floods the server with large appends (SQLite, the
embedded default), at OPPU_HISTORY_WRITES_PER_USER_MAX 1 (the default) and at a higher cap, in ONE run.

One uvicorn server per setting in this process (the tests' live_server; a tiny random model: appends never reach
it), each on its own SQLite file. 4 neighbours append one 200-character item, then pause 50 ms, in a loop; the
flooding user runs `--clients` connections, each sending 1,000-item appends (~0.5 MB) back to back until its
quota is used up (409) or the time is over. Settings alternate across rounds, so drift of a shared box hits both alike.

Prints ONE JSON object (and writes it with --out): per setting and round, the neighbours' append latency
(p50/p90/max, count, statuses) and the flood's statuses; and the machine record.

    .venv/bin/python bench/history_flood.py --out bench/results/history-flood.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.machine import machine_record
from service.config import Settings
from service.db.migrate import upgrade
from service.main import create_app
from tests.conftest import live_server
from tests.models import MODEL_CACHE_DIR, tiny_model_dir

ADMIN_KEY = "bench-admin-key-" + "x" * 24
NEIGHBOURS = 4


def settings(work: Path, writes: int) -> Settings:
    db = f"sqlite:///{work / 'db.sqlite3'}"
    upgrade(db)
    return Settings(
        data_dir=work / "data",
        database_url=db,
        adapters_dir=work / "adapters",
        model=str(tiny_model_dir()),
        model_cache_dir=MODEL_CACHE_DIR,
        admin_key=ADMIN_KEY,
        dtype="float32",
        history_writes_per_user_max=writes,
        prepare_per_user_max=1,
        queue_per_user_max=64,  # the flood's clients all wait their turn (none is refused with 429)
    )


def new_user(base: str, user: str) -> dict[str, str]:
    r = httpx.post(f"{base}/admin/users", json={"user_id": user}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def flood_round(base: str, clients: int, seconds: float) -> dict[str, Any]:
    flooder = new_user(base, "flood")
    neighbours = {f"n{i}": new_user(base, f"n{i}") for i in range(NEIGHBOURS)}
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    flood_statuses: Counter[int] = Counter()

    def neighbour(user: str) -> None:
        with httpx.Client(timeout=120) as c:
            i = 0
            while time.monotonic() < stop:
                i += 1
                started = time.monotonic()
                body = {"items": [{"id": f"{user}-{i}", "output": "x" * 200}]}
                r = c.post(f"{base}/users/{user}/history", json=body, headers=neighbours[user])
                latencies.append(time.monotonic() - started)
                statuses[r.status_code] += 1
                time.sleep(0.05)

    def flood(k: int) -> None:
        with httpx.Client(timeout=120) as c:
            i = 0
            while time.monotonic() < stop:
                i += 1
                body = {"items": [{"id": f"f{k}-{i}-{j}", "output": f"y{j} " * 120} for j in range(1000)]}
                r = c.post(f"{base}/users/flood/history", json=body, headers=flooder)
                flood_statuses[r.status_code] += 1

    threads = [threading.Thread(target=neighbour, args=(u,)) for u in neighbours]
    threads += [threading.Thread(target=flood, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {
        "neighbour_appends": len(latencies),
        "neighbour_p50_s": round(statistics.median(latencies), 3),
        "neighbour_p90_s": round(latencies[int(0.9 * len(latencies))], 3),
        "neighbour_max_s": round(latencies[-1], 3),
        "neighbour_statuses": dict(statuses),
        "flood_statuses": dict(flood_statuses),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16, help="the flooding user's connections")
    ap.add_argument("--writes", default="1,6", help="OPPU_HISTORY_WRITES_PER_USER_MAX values, comma separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    values = [int(v) for v in args.writes.split(",")]
    results: dict[str, list[dict[str, Any]]] = {f"writes_per_user_{v}": [] for v in values}
    for r in range(args.rounds):
        for v in values if r % 2 == 0 else values[::-1]:
            with tempfile.TemporaryDirectory() as work, live_server(create_app(settings(Path(work), v))) as base:
                results[f"writes_per_user_{v}"].append({"round": r, **flood_round(base, args.clients, args.seconds)})
    report = {
        "bench": "history.appends_under_a_flood",
        "command": " ".join(["python", *sys.argv]),
        "clients": args.clients,
        "seconds": args.seconds,
        "neighbours": NEIGHBOURS,
        "results": results,
        "machine": machine_record(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
