"""bench/routing_sim.py on a tiny configuration (4 replicas, 2,000 Zipf users, synthetic costs): the properties
the policy comparison rests on, checked on the simulator's own outcome (nothing here is a recorded figure)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.routing_sim import Costs, Replica, Ring, Shape, capacity, make_router, simulate

COSTS = Costs(
    decode_s={1: 0.010, 4: 0.012, 16: 0.020}, prefill_per_token_s=0.0003, disk_to_host_s=0.015, host_to_slot_s=0.002
)
SHAPE = Shape(rows=8, slots=4, host=16, prompt_tokens=16, new_tokens=8)
REPLICAS, USERS, REQUESTS = 4, 2_000, 3_000
HEAD = list(range(10))  # the Zipf head: ranks 1-10 are ids 0-9


def rate(load: float) -> float:
    return load * capacity(COSTS, SHAPE) * REPLICAS


def test_step_table_interpolates_between_measured_sizes() -> None:
    table = COSTS.step_table(16)
    assert table[0] == table[1] == pytest.approx(0.010)  # a prefill-only step pays the b=1 overhead
    assert table[4] == pytest.approx(0.012)
    assert table[10] == pytest.approx(0.012 + 6 * (0.020 - 0.012) / 12)
    assert table == sorted(table)


def test_consistent_hash_keeps_every_user_on_its_ring_replica() -> None:
    out = simulate("chash", REPLICAS, USERS, rate(0.5), COSTS, SHAPE, REQUESTS, track_users=HEAD)
    ring = Ring.build(REPLICAS)
    owners = ring.owner[ring.start(np.array(HEAD))].tolist()
    assert [out.placements[u] for u in HEAD] == [[o] for o in owners]
    assert len(set(owners)) > 1  # the ring spreads even ten users over more than one replica


def test_bounded_loads_caps_every_replica_where_plain_hashing_does_not() -> None:
    plain = simulate("chash", REPLICAS, USERS, rate(0.8), COSTS, SHAPE, REQUESTS)
    bounded = simulate("chash_bounded", REPLICAS, USERS, rate(0.8), COSTS, SHAPE, REQUESTS, track_users=HEAD)
    assert plain.over_cap > 0  # the Zipf head overloads its replica: the cap is a real constraint here
    assert bounded.over_cap == 0
    # and it still prefers the ring: a user's requests spread over fewer replicas than least-loaded's
    least = simulate("least_loaded", REPLICAS, USERS, rate(0.8), COSTS, SHAPE, REQUESTS, track_users=HEAD)
    spread = [sum(len(p) for p in o.placements.values()) for o in (bounded, least)]
    assert spread[0] < spread[1]


def test_bounded_router_walks_the_ring_past_full_replicas() -> None:
    ring = Ring.build(REPLICAS)
    user = 7
    starts = {user: int(ring.start(np.array([user]))[0])}
    route = make_router("chash_bounded", ring, starts, 1.25, SHAPE, 0)
    replicas = [Replica() for _ in range(REPLICAS)]
    home = int(ring.owner[starts[user]])
    load = [0] * REPLICAS
    assert route(0, user, replicas, load) == home
    load[home] = 10  # the cap is ceil(1.25 * 11 / 4) = 4: home is full
    assert math.ceil(1.25 * (sum(load) + 1) / REPLICAS) == 4
    chosen = route(0, user, replicas, load)
    assert chosen != home
    # the next replica clockwise on the ring, not any replica
    i = starts[user]
    while int(ring.owner[i]) == home:
        i = (i + 1) % len(ring.owner)
    assert chosen == int(ring.owner[i])


def test_least_loaded_spreads_the_skew_that_hashing_concentrates() -> None:
    plain = simulate("chash", REPLICAS, USERS, rate(0.7), COSTS, SHAPE, REQUESTS)
    least = simulate("least_loaded", REPLICAS, USERS, rate(0.7), COSTS, SHAPE, REQUESTS)
    assert least.skew <= plain.skew
    assert least.share_max < plain.share_max
    assert least.ttft_p99_s <= plain.ttft_p99_s


def test_residency_scoring_keeps_more_adapters_warm_than_least_loaded() -> None:
    least = simulate("least_loaded", REPLICAS, USERS, rate(0.5), COSTS, SHAPE, REQUESTS)
    aware = simulate("residency", REPLICAS, USERS, rate(0.5), COSTS, SHAPE, REQUESTS)
    blind = simulate("load_only", REPLICAS, USERS, rate(0.5), COSTS, SHAPE, REQUESTS)  # the same scorers but affinity
    assert aware.slot_hit_rate > least.slot_hit_rate
    assert aware.slot_hit_rate > blind.slot_hit_rate
    assert aware.disk_loads_per_s < least.disk_loads_per_s


def test_every_counted_request_gets_a_first_token_and_overload_shows_in_ttft() -> None:
    light = simulate("least_loaded", REPLICAS, USERS, rate(0.3), COSTS, SHAPE, REQUESTS)
    heavy = simulate("least_loaded", REPLICAS, USERS, rate(1.4), COSTS, SHAPE, REQUESTS)
    assert light.requests == heavy.requests == REQUESTS - int(REQUESTS * 0.3)
    assert 0 < light.ttft_p50_s <= light.ttft_p99_s
    assert heavy.ttft_p99_s > 5 * light.ttft_p99_s  # past capacity the queue grows
