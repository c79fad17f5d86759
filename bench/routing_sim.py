"""Routing past one machine, by simulation (issue 22 item 5): a discrete-event model of R replicas of our builtin
engine (continuous batching, LoRA slots <- host LRU <- disk) behind a router, driven by costs measured on this
machine, for 8-64 replicas and 10k-1M users with Zipf-distributed traffic.

It owns the simulator (`simulate`), the four routing policies and the sweep; the cost measurement (`--measure`,
the default when no costs are reused) times the real engine's pieces in-process, one torch thread (one core per
replica):
- step time by batch size: `Executor.forward` of a decode step with b rows (b = 1, 2, 4, 8, 16), every row its own
  adapter slot, and a prompt chunk's cost per token (a mixed step minus the decode step), as bench/engine_step.py;
- a cold load per tier through `AdapterCache`: disk -> host (read + validate a PEFT folder) and host -> slot (copy
  into the device slot), r=8 LoRAs on q/v as bench/scale.py writes them.

Policies (the router sees each replica's state at the arrival, no scrape lag):
- `chash`: consistent hash of the user on a ring (160 points per replica), nginx's `hash ... consistent`;
- `chash_bounded`: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): walk the ring
  from the user's point to the first replica whose in-flight requests are below ceil(c * (m + 1) / R), c = 1.25;
- `least_loaded`: the replica with the fewest in-flight (queued + running) requests;
- `residency`: llm-d's scorers summed with deploy/k8s/router.yaml's weights: queue depth (min-max normalised,
  weight 2), running rows (1 - running / rows, the KV-cache utilisation scorer, weight 1) and LoRA affinity
  (1 adapter in a slot, 0.5 in host memory, 0.25 a free slot, else 0; weight 3);
- `residency_a2`: the same with the affinity weight at 2 (= the queue's);
- `load_only`: the same without the affinity term (what the queue and KV scorers alone do).

Per (replicas, users, policy): at a reference load (a share of the measured capacity) cold loads/s per tier,
TTFT p50/p99, utilisation skew (max / mean busy time over replicas); and the break rate: the highest arrival rate
(req/s, found by bisection) at which TTFT p99 stays within the bound. JSON to bench/results/routing_sim.json.

Usage: .venv/bin/python bench/routing_sim.py [--reuse-costs JSON] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# bench.machine, bench.engine_step, bench.scale; appended, so PYTHONPATH=<a checkout> measures that code instead
sys.path.append(str(REPO))
RESULTS = REPO / "bench" / "results" / "routing_sim.json"
POLICIES = ("chash", "chash_bounded", "least_loaded", "load_only", "residency", "residency_a2")
# llm-d's scorers with the weights of deploy/k8s/router.yaml: lora-affinity 3, queue 2, kv-cache utilisation 1
# (our vllm:kv_cache_usage_perc is running rows / KV lanes). `load_only` drops the affinity term (the ablation),
# `residency_a2` weighs affinity like the queue (2).
SCORER_WEIGHTS = {  # queue, running, affinity
    "residency": (2.0, 1.0, 3.0),
    "residency_a2": (2.0, 1.0, 2.0),
    "load_only": (2.0, 1.0, 0.0),
}
RING_POINTS = 160
LOOKAHEAD = 64
MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Costs:
    """Seconds, measured on this machine (or given by a test)."""

    decode_s: dict[int, float]  # batch size -> decode step seconds
    prefill_per_token_s: float
    disk_to_host_s: float
    host_to_slot_s: float
    # The rest of a request's work in the replica's process (HTTP, tokenizer, sampler, SSE), which shares the
    # process (and the GIL) with the engine thread: charged to the step that admits the row.
    request_overhead_s: float = 0.0

    def step_table(self, rows: int) -> list[float]:
        """Decode step seconds for 0..rows running rows, linear between the measured sizes (b=0: the b=1 step,
        a step that only prefills still pays the per-step overhead)."""
        sizes = sorted(self.decode_s)
        out = []
        for b in range(rows + 1):
            b = max(b, sizes[0])
            i = bisect.bisect_left(sizes, b)
            if i == len(sizes):  # beyond the largest measured size: extrapolate the last slope
                lo, hi = sizes[-2], sizes[-1]
            elif sizes[i] == b:
                out.append(self.decode_s[b])
                continue
            else:
                lo, hi = sizes[i - 1], sizes[i]
            slope = (self.decode_s[hi] - self.decode_s[lo]) / (hi - lo)
            out.append(self.decode_s[lo] + slope * (b - lo))
        return out


@dataclass(frozen=True)
class Shape:
    """One replica's engine and the requests."""

    rows: int = 16  # OPPU_BATCH_MAX_SIZE
    slots: int = 16  # OPPU_ADAPTER_SLOTS
    host: int = 64  # host-tier capacity in adapters
    prompt_tokens: int = 32
    new_tokens: int = 16


@dataclass
class Replica:
    slots: OrderedDict[int, None] = field(default_factory=OrderedDict)  # user -> resident, LRU order
    pins: dict[int, int] = field(default_factory=dict)
    host: OrderedDict[int, None] = field(default_factory=OrderedDict)
    waiting: deque[tuple[int, int, float, float]] = field(default_factory=deque)  # (req, user, arrival, ready)
    running: int = 0
    finishing: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # step -> [(req, user)]
    step: int = 0
    busy_until: float = -1.0  # end of the step in progress (< now: idle)
    wake_at: float = math.inf  # a scheduled start for a row whose adapter is still being read from disk
    busy_s: float = 0.0
    requests: int = 0


@dataclass(frozen=True)
class Outcome:
    requests: int
    duration_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    disk_loads_per_s: float
    slot_loads_per_s: float
    slot_hit_rate: float
    skew: float  # max / mean busy time over replicas
    share_max: float  # the busiest replica's share of the requests
    placements: dict[int, list[int]]  # user -> replicas that served them (only for the users asked about)
    max_in_flight: list[int]  # per replica, the most requests it held at once (queued + running)
    over_cap: int  # routings that left the chosen replica above ceil(c * mean in-flight) (bounded loads: 0)


# --- hashing -----------------------------------------------------------------------------------------------
def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: well-spread ring points and user points from small integers."""
    z = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(MASK)
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(MASK)
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(MASK)
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Ring:
    points: np.ndarray  # sorted uint64 positions
    owner: np.ndarray  # replica of each point

    @staticmethod
    def build(replicas: int, points: int = RING_POINTS) -> Ring:
        ids = np.arange(replicas * points, dtype=np.uint64) + np.uint64(1 << 40)  # apart from the user ids
        pos = mix64(ids)
        order = np.argsort(pos)
        return Ring(pos[order], (np.arange(replicas * points) // points)[order])

    def start(self, users: np.ndarray) -> np.ndarray:
        """Each user's first ring index clockwise from its point."""
        return np.searchsorted(self.points, mix64(users)) % len(self.points)


# --- policies ----------------------------------------------------------------------------------------------
Router = Callable[[int, int, list[Replica], list[int]], int]  # (request, user, replicas, in-flight) -> replica


def make_router(policy: str, ring: Ring, starts: dict[int, int], c: float, shape: Shape, seed: int) -> Router:
    rng = np.random.default_rng(seed)
    owner = ring.owner.tolist()
    n_points = len(owner)

    def chash(_req: int, user: int, _reps: list[Replica], _load: list[int]) -> int:
        return int(owner[starts[user]])

    def bounded(_req: int, user: int, reps: list[Replica], load: list[int]) -> int:
        cap = math.ceil(c * (sum(load) + 1) / len(reps))
        i, seen = starts[user], set()
        for _ in range(n_points):
            r = int(owner[i])
            if r not in seen:
                if load[r] < cap:
                    return r
                seen.add(r)
                if len(seen) == len(reps):
                    break
            i = (i + 1) % n_points
        return int(owner[starts[user]])  # unreachable: some replica is always under the cap

    def least(_req: int, _user: int, _reps: list[Replica], load: list[int]) -> int:
        low = min(load)
        ties = [r for r, v in enumerate(load) if v == low]
        return ties[int(rng.integers(len(ties)))]

    w_queue, w_running, w_affinity = SCORER_WEIGHTS.get(policy, (0.0, 0.0, 0.0))

    def residency(_req: int, user: int, reps: list[Replica], load: list[int]) -> int:
        queues = [len(rep.waiting) for rep in reps]
        qmin, qmax = min(queues), max(queues)
        best, best_score, ties = 0, -math.inf, 0
        for r, rep in enumerate(reps):
            queue = 1.0 if qmax == qmin else (qmax - queues[r]) / (qmax - qmin)
            running = 1.0 - rep.running / shape.rows
            if user in rep.slots:
                affinity = 1.0
            elif user in rep.host:
                affinity = 0.5
            elif len(rep.slots) < shape.slots:
                affinity = 0.25
            else:
                affinity = 0.0
            score = w_queue * queue + w_running * running + w_affinity * affinity
            if score > best_score + 1e-12:
                best, best_score, ties = r, score, 1
            elif abs(score - best_score) <= 1e-12:
                ties += 1
                if rng.integers(ties) == 0:  # reservoir: a uniform choice among equal scores
                    best = r
        return best

    routers: dict[str, Router] = {
        "chash": chash,
        "chash_bounded": bounded,
        "least_loaded": least,
        "load_only": residency,
        "residency": residency,
        "residency_a2": residency,
    }
    return routers[policy]


# --- the simulator -----------------------------------------------------------------------------------------
def zipf_users(users: int, n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """n user ids drawn Zipf(s) over ranks 1..users; the rank is the id (the hash spreads ids anyway)."""
    weights = 1.0 / np.arange(1, users + 1, dtype=np.float64) ** s
    cdf = np.cumsum(weights)
    drawn: np.ndarray = np.searchsorted(cdf, rng.random(n) * cdf[-1]).astype(np.int64)
    return drawn


def simulate(
    policy: str,
    replicas: int,
    users: int,
    rate: float,
    costs: Costs,
    shape: Shape = Shape(),
    requests: int = 20_000,
    warm_share: float = 0.3,
    zipf_s: float = 1.1,
    c: float = 1.25,
    seed: int = 0,
    track_users: Sequence[int] = (),
) -> Outcome:
    """Poisson arrivals at `rate` req/s; the first `warm_share` of the requests fill the caches and are not
    counted. TTFT = arrival -> the end of the step that ran the row's prompt."""
    rng = np.random.default_rng(seed)
    req_users = zipf_users(users, requests, zipf_s, rng)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, requests))
    ring = Ring.build(replicas)
    distinct = np.unique(req_users)
    starts = dict(zip(distinct.tolist(), ring.start(distinct).tolist(), strict=True))
    route = make_router(policy, ring, starts, c, shape, seed + 1)
    step_s = costs.step_table(shape.rows)
    reps = [Replica() for _ in range(replicas)]
    load = [0] * replicas
    peak = [0] * replicas
    warm_n = int(requests * warm_share)
    t_warm = float(arrivals[warm_n]) if warm_n < requests else 0.0
    ttft: list[float] = []
    counted = {"disk": 0, "slot": 0, "slot_hit": 0}
    tracked = set(track_users)
    placements: dict[int, set[int]] = {u: set() for u in tracked}
    events: list[
        tuple[float, int, int, int]
    ] = []  # (time, seq, kind, replica or request): 0 step end, 1 arrival, 2 wake
    seq = 0
    users_list = req_users.tolist()
    for i in range(requests):
        events.append((float(arrivals[i]), seq, 1, i))
        seq += 1
    heapq.heapify(events)

    def count(kind: str, now: float) -> None:
        if now >= t_warm:
            counted[kind] += 1

    def start_step(r: int, now: float) -> None:
        """Admit what fits, then run one step: decode the running rows, prefill the admitted ones."""
        nonlocal seq
        rep = reps[r]
        admitted: list[tuple[int, int, float]] = []
        loads = 0
        later = math.inf
        kept: list[tuple[int, int, float, float]] = []
        scanned = 0
        # The scheduler looks LOOKAHEAD rows deep past rows that cannot start yet (an overloaded replica's queue
        # is long: scanning all of it every step would cost the simulation, not the engine, quadratic time).
        while rep.waiting and scanned < LOOKAHEAD and rep.running + len(admitted) < shape.rows:
            item = rep.waiting.popleft()
            scanned += 1
            req, user, arrived, ready = item
            if ready > now:  # its adapter is still being read from disk (the request thread's prefetch)
                later = min(later, ready)
                kept.append(item)
                continue
            if user in rep.slots:
                rep.slots.move_to_end(user)
                count("slot_hit", now)
            else:
                if len(rep.slots) >= shape.slots:
                    victim = next((u for u in rep.slots if rep.pins.get(u, 0) == 0), None)
                    if victim is None:  # every slot pinned by a running row: wait for one to finish
                        kept.append(item)
                        continue
                    del rep.slots[victim]
                rep.slots[user] = None
                loads += 1
                count("slot", now)
                if user in rep.host:
                    rep.host.move_to_end(user)
            rep.pins[user] = rep.pins.get(user, 0) + 1
            admitted.append((req, user, arrived))
        rep.waiting.extendleft(reversed(kept))  # the rows passed over keep their place at the head
        n_decode = rep.running
        if not admitted and n_decode == 0:
            rep.busy_until = -1.0
            if later < math.inf:
                rep.wake_at = later
                heapq.heappush(events, (later, seq, 2, r))
                seq += 1
            return
        duration = (
            step_s[n_decode]
            + len(admitted) * shape.prompt_tokens * costs.prefill_per_token_s
            + loads * costs.host_to_slot_s
            + len(admitted) * costs.request_overhead_s
        )
        end = now + duration
        if end > t_warm:
            rep.busy_s += end - max(now, t_warm)
        rep.step += 1
        for req, user, arrived in admitted:
            if arrived >= t_warm:
                ttft.append(end - arrived)
            if shape.new_tokens <= 1:
                rep.finishing.setdefault(rep.step, []).append((req, user))
            else:
                rep.finishing.setdefault(rep.step + shape.new_tokens - 1, []).append((req, user))
        rep.running += len(admitted)
        rep.busy_until = end
        heapq.heappush(events, (end, seq, 0, r))
        seq += 1

    now, in_flight, over_cap = 0.0, 0, 0
    while events:
        now, _, kind, who = heapq.heappop(events)
        if kind == 1:  # arrival
            user = users_list[who]
            r = route(who, user, reps, load)
            rep = reps[r]
            if user in placements:
                placements[user].add(r)
            load[r] += 1
            peak[r] = max(peak[r], load[r])
            in_flight += 1
            if load[r] > math.ceil(c * in_flight / replicas):
                over_cap += 1
            if arrivals[who] >= t_warm:
                rep.requests += 1
            ready = now
            if user not in rep.slots and user not in rep.host:
                count("disk", now)
                ready = now + costs.disk_to_host_s
                rep.host[user] = None
                if len(rep.host) > shape.host:
                    rep.host.popitem(last=False)
            elif user in rep.host:
                rep.host.move_to_end(user)
            rep.waiting.append((who, user, now, ready))
            if rep.busy_until < now:
                start_step(r, now)
        elif kind == 0:  # step end
            rep = reps[who]
            for _req, user in rep.finishing.pop(rep.step, []):
                rep.running -= 1
                load[who] -= 1
                in_flight -= 1
                rep.pins[user] -= 1
                if rep.pins[user] == 0:
                    del rep.pins[user]
            start_step(who, now)
        elif reps[who].busy_until < now and reps[who].wake_at <= now:  # a wake-up for a prefetched row
            reps[who].wake_at = math.inf
            start_step(who, now)
    duration = max(now - t_warm, 1e-9)
    window = max(float(arrivals[-1]) - t_warm, 1e-9)  # loads per second of offered traffic (not of the drain)
    busy = [rep.busy_s for rep in reps]
    mean_busy = statistics.fmean(busy)
    served = [rep.requests for rep in reps]
    slot_total = counted["slot"] + counted["slot_hit"]
    return Outcome(
        requests=len(ttft),
        duration_s=duration,
        ttft_p50_s=float(np.percentile(ttft, 50)) if ttft else math.inf,
        ttft_p99_s=float(np.percentile(ttft, 99)) if ttft else math.inf,
        disk_loads_per_s=counted["disk"] / window,
        slot_loads_per_s=counted["slot"] / window,
        slot_hit_rate=counted["slot_hit"] / slot_total if slot_total else 0.0,
        skew=max(busy) / mean_busy if mean_busy > 0 else 1.0,
        share_max=max(served) / max(1, sum(served)),
        placements={u: sorted(p) for u, p in placements.items()},
        max_in_flight=peak,
        over_cap=over_cap,
    )


def capacity(costs: Costs, shape: Shape) -> float:
    """Requests/s one replica finishes with every row busy and adapters resident (the yardstick for loads)."""
    step = costs.step_table(shape.rows)[shape.rows]
    per_request = shape.new_tokens * step / shape.rows + shape.prompt_tokens * costs.prefill_per_token_s
    return 1.0 / (per_request + costs.request_overhead_s)


def calibrate_overhead(costs: Costs, shape: Shape, policy_json: Path) -> dict[str, Any] | None:
    """The per-request overhead the forward passes do not explain: the cluster bench's CPU seconds per request
    (bench/results/routing_policy.json: both replicas' CPU time / tokens, x new tokens) minus this model's cost of
    a request at that bench's largest batch (its mean batch was smaller, so this errs towards less overhead)."""
    if not policy_json.is_file():
        return None
    bench = json.loads(policy_json.read_text())
    per_token = [p["summary"]["cpu_s_per_token"] for p in bench.get("policies", {}).values() if "summary" in p]
    if not per_token:
        return None
    cfg = bench["config"]
    rows, new = int(cfg["batch_max_size"]), int(cfg["new_tokens"])
    model = new * costs.step_table(rows)[rows] / rows + shape.prompt_tokens * costs.prefill_per_token_s
    measured = statistics.median(per_token) * new
    return {
        "source": str(policy_json.relative_to(REPO)) if policy_json.is_relative_to(REPO) else str(policy_json),
        "cluster_cpu_s_per_request": round(measured, 4),
        "model_s_per_request_at_batch": {"rows": rows, "seconds": round(model, 4)},
        "request_overhead_s": round(max(0.0, measured - model), 4),
    }


def break_rate(
    policy: str, replicas: int, users: int, costs: Costs, shape: Shape, bound_s: float, requests: int, iters: int
) -> float:
    """The highest rate at which TTFT p99 <= bound_s: bisection on a log scale over [0.02, 1.5] x capacity, so the
    answer is within (1.5 / 0.02) ** (1 / 2 ** iters) of the true one whichever end it is near (7 iters: 3.4 %)."""
    cap = capacity(costs, shape) * replicas
    lo, hi = 0.02 * cap, 1.5 * cap
    if simulate(policy, replicas, users, hi, costs, shape, requests).ttft_p99_s <= bound_s:
        return hi
    if simulate(policy, replicas, users, lo, costs, shape, requests).ttft_p99_s > bound_s:
        return 0.0
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if simulate(policy, replicas, users, mid, costs, shape, requests).ttft_p99_s <= bound_s:
            lo = mid
        else:
            hi = mid
    return lo


# --- measured costs ----------------------------------------------------------------------------------------
def measure_costs() -> dict[str, Any]:
    """Step times and tier loads of the real engine pieces, one torch thread, in the dtype `auto` picks."""
    import copy
    import tempfile

    import torch

    from bench.engine_step import SLOTS, decode_batch, mixed_batch, timed
    from bench.scale import write_adapters
    from service.adapters.cache import AdapterCache
    from service.adapters.slots import LoraSlots
    from service.config import Settings
    from service.engine.builtin.executor import Executor, head_dim
    from service.engine.builtin.kv import KVLanes
    from service.engine.types import AdapterRef
    from service.inference.loader import load_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    loaded = load_model(Settings(model_cache_dir=REPO / ".cache" / "models", torch_threads=1))
    model, dtype = loaded.model, loaded.dtype
    plain = copy.deepcopy(model)  # LoraSlots patches a model once: the cache's own slots go on a copy
    targets = ("q_proj", "v_proj")
    slots = LoraSlots(model, SLOTS, 8, targets, device=loaded.device, dtype=dtype)
    for layer in slots.layers.values():
        for s in range(1, SLOTS + 1):
            a, b = layer.prepare(s, 8)
            a.copy_(torch.randn_like(a) * 0.02)
            b.copy_(torch.randn_like(b) * 0.02)
    cfg = model.config
    kv = KVLanes(
        layers=int(cfg.num_hidden_layers), lanes=SLOTS + 1, kv_heads=int(cfg.num_key_value_heads),
        head_dim=head_dim(cfg), capacity=1024, device=loaded.device, dtype=dtype,
    )  # fmt: skip
    ex = Executor(model, kv, slots)

    wall: dict[str, float] = {}

    def step_seconds(name: str, batch: Any, repeat: int) -> float:
        """CPU seconds of one step (median): with one torch thread that is its time on an idle core, which the
        other tenants of a shared box do not inflate as they inflate wall time (kept beside it)."""
        wall[name] = timed(lambda: ex.forward(batch), 3)
        cpu = []
        for _ in range(repeat):
            started = time.thread_time()
            ex.forward(batch)
            cpu.append(time.thread_time() - started)
        return statistics.median(cpu)

    decode = {b: step_seconds(f"decode_{b}", decode_batch(b, 40), 15) for b in (1, 2, 4, 8, 16)}
    chunk = 32
    mixed = step_seconds("mixed", mixed_batch(8, 40, chunk), 10)
    prefill_per_token = max(0.0, (mixed - decode[8]) / chunk)
    # tier loads through the real cache: 24 distinct adapters, each read from disk once, then put in a slot
    load_s: dict[str, list[float]] = {"host": [], "slot": []}  # the cache's own wall-clock timings
    load_cpu: dict[str, list[float]] = {"host": [], "slot": []}

    def on_event(event: str, tier: str, seconds: float) -> None:
        if event == "load":
            load_s[tier].append(seconds)

    with tempfile.TemporaryDirectory(prefix="routing-sim-") as tmp:
        dirs = write_adapters(plain, Path(tmp), 24)
        cache_slots = LoraSlots(plain, 8, 8, targets, device=loaded.device, dtype=dtype)
        cache = AdapterCache(cache_slots, host_budget_bytes=64 << 20, max_scale=256.0, on_event=on_event)
        for i, d in enumerate(dirs):
            ref = AdapterRef(f"u{i}", 1, f"{i:064d}", d)
            started = time.thread_time()
            cache.host_weights(ref)
            load_cpu["host"].append(time.thread_time() - started)
            started = time.thread_time()
            cache.acquire([ref])
            load_cpu["slot"].append(time.thread_time() - started)
            cache.release([ref])
    return {
        "method": "bench/routing_sim.py --measure: Executor.forward (bench/engine_step.py batches, contexts of 40, "
        "r=8 q/v slots) and AdapterCache loads of 24 r=8 q/v fp16 adapters (files just written: page cache); one torch "
        "thread; medians of CPU seconds (thread_time), the wall times under the box's load beside them",
        "dtype": str(dtype).removeprefix("torch."),
        "decode_step_ms": {str(b): round(s * 1e3, 3) for b, s in decode.items()},
        "mixed_step_ms_8_rows_32_chunk": round(mixed * 1e3, 3),
        "prefill_per_token_ms": round(prefill_per_token * 1e3, 4),
        "disk_to_host_ms": round(statistics.median(load_cpu["host"]) * 1e3, 3),
        "host_to_slot_ms": round(statistics.median(load_cpu["slot"]) * 1e3, 3),
        "wall_ms_under_load": {k: round(v * 1e3, 2) for k, v in wall.items()}
        | {f"{t}_load": round(statistics.median(v) * 1e3, 2) for t, v in load_s.items()},
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "code": code_record(),
    }


def code_record() -> dict[str, str]:
    """Which checkout's `service` the costs were measured on (the shared working tree moves under us): this
    repository's HEAD, or a `git archive` export on PYTHONPATH whose COMMIT file names its commit."""
    import service

    where = Path(service.__file__).resolve().parent.parent
    marker = where / "COMMIT"
    if where != REPO and marker.is_file():
        return {"service_from": "git archive export", "commit": marker.read_text().strip()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"service_from": str(where), "repo_head": commit, "note": "working tree (may differ from HEAD)"}


def costs_from(record: dict[str, Any]) -> Costs:
    return Costs(
        decode_s={int(b): ms / 1e3 for b, ms in record["decode_step_ms"].items()},
        prefill_per_token_s=record["prefill_per_token_ms"] / 1e3,
        disk_to_host_s=record["disk_to_host_ms"] / 1e3,
        host_to_slot_s=record["host_to_slot_ms"] / 1e3,
    )


# --- the sweep ---------------------------------------------------------------------------------------------
def sweep(
    costs: Costs,
    shape: Shape,
    replicas: Sequence[int],
    users: Sequence[int],
    policies: Sequence[str],
    ref_load: float,
    bound_s: float,
    per_replica: int,
    iters: int,
) -> list[dict[str, Any]]:
    rows = []
    for r in replicas:
        for u in users:
            requests = max(4000, per_replica * r)
            rate = ref_load * capacity(costs, shape) * r
            for policy in policies:
                started = time.perf_counter()
                out = simulate(policy, r, u, rate, costs, shape, requests)
                # the bisection's runs are half as long: 9 of them per row (the caches still fill: 30% warm-up)
                broke = break_rate(policy, r, u, costs, shape, bound_s, max(2000, requests // 2), iters)
                row = {
                    "replicas": r, "users": u, "policy": policy, "requests": requests,
                    "ref_rate_rps": round(rate, 1), "ttft_p50_s": round(out.ttft_p50_s, 4),
                    "ttft_p99_s": round(out.ttft_p99_s, 4), "disk_loads_per_s": round(out.disk_loads_per_s, 1),
                    "slot_loads_per_s": round(out.slot_loads_per_s, 1), "slot_hit_rate": round(out.slot_hit_rate, 3),
                    "skew": round(out.skew, 3), "share_max": round(out.share_max, 4),
                    "break_rate_rps": round(broke, 1),
                    "break_load": round(broke / (capacity(costs, shape) * r), 3),
                    "sim_s": round(time.perf_counter() - started, 2),
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def command_line() -> str:
    env = [f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []
    return " ".join(shlex.quote(a) for a in [*env, ".venv/bin/python", "bench/routing_sim.py", *sys.argv[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--reuse-costs", type=Path, default=None, help="a routing_sim JSON whose measured costs to reuse (no measuring)"
    )
    parser.add_argument("--quick", action="store_true", help="8 and 16 replicas, 10k users, fewer requests")
    parser.add_argument("--ref-load", type=float, default=0.6, help="reference load, a share of the capacity")
    parser.add_argument("--ttft-bound", type=float, default=1.0, help="seconds: TTFT p99 above it = broken")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--calibrate", type=Path, default=REPO / "bench" / "results" / "routing_policy.json",
        help="the cluster bench whose CPU per request sets the per-request overhead",
    )  # fmt: skip
    parser.add_argument("--no-overhead", action="store_true", help="forward passes and loads only")
    args = parser.parse_args()
    out_path = args.out or (None if args.quick else RESULTS)
    if args.reuse_costs is not None:
        record = json.loads(args.reuse_costs.read_text())["costs"] | {"reused_from": str(args.reuse_costs)}
    else:
        record = measure_costs()
    shape = Shape()
    costs = costs_from(record)
    calibration = None if args.no_overhead else calibrate_overhead(costs, shape, args.calibrate)
    if calibration is not None:
        costs = replace(costs, request_overhead_s=calibration["request_overhead_s"])
    replicas, users = ((8, 16), (10_000,)) if args.quick else ((8, 16, 32, 64), (10_000, 100_000, 1_000_000))
    per_replica, iters = (300, 4) if args.quick else (600, 7)
    from bench.machine import machine_record

    started = time.perf_counter()
    rows = sweep(costs, shape, replicas, users, POLICIES, args.ref_load, args.ttft_bound, per_replica, iters)
    report = {
        "bench": "routing_sim",
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_record(dtype=record.get("dtype")),
        "costs": record,
        "request_overhead": calibration,
        "shape": asdict(shape),
        "zipf_s": 1.1,
        "bounded_loads_c": 1.25,
        "ring_points_per_replica": RING_POINTS,
        "scorer_weights": {
            p: dict(zip(("queue", "running", "lora_affinity"), w, strict=True)) for p, w in SCORER_WEIGHTS.items()
        },
        "capacity_rps_per_replica": round(capacity(costs, shape), 2),
        "ref_load": args.ref_load,
        "ttft_bound_s": args.ttft_bound,
        "warm_share": 0.3,
        "break_search": {"range_of_capacity": [0.02, 1.5], "scale": "log", "iterations": iters, "requests": "half"},
        "requests_per_run": f"max(4000, {per_replica} x replicas)",
        "sweep_s": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if out_path is not None:
        out_path.write_text(text + "\n")


if __name__ == "__main__":
    main()
