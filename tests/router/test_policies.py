"""Routing policies and the per-worker prefix index."""
from __future__ import annotations

import pytest

from engine.radix_cache import page_hashes
from router.policies import RouteRequest, create_policy, policy_names
from router.worker_state import PrefixIndex, WorkerLoad, WorkerState
from tests.router.prefill_sim import SimClock, SimStatus, group_workload, simulate


def worker(worker_id: str, role: str = "prefill", **load: int) -> WorkerState:
    return WorkerState(role, worker_id, f"{worker_id}:1", healthy=True, load=WorkerLoad(page_size=4, **load))


def test_registry_of_policies() -> None:
    assert {"prefix_aware", "load", "round_robin", "random"} <= set(policy_names())
    with pytest.raises(ValueError, match="unknown routing policy"):
        create_policy("fastest")


def test_decode_by_load() -> None:
    busy = worker("busy", "decode", running=6, kv_pages_total=100, kv_pages_free=90)
    full = worker("full", "decode", running=1, kv_pages_total=100, kv_pages_free=2)
    idle = worker("idle", "decode", running=1, kv_pages_total=100, kv_pages_free=95)
    ranked = create_policy("prefix_aware").rank_decode(RouteRequest([1, 2, 3]), [busy, full, idle])
    assert [w.id for w in ranked] == ["idle", "full", "busy"]


def test_decode_counts_requests_in_flight_from_the_router() -> None:
    a, b = worker("a", "decode"), worker("b", "decode")
    leases = [a.lease() for _ in range(3)]
    policy = create_policy("load")
    assert policy.rank_decode(RouteRequest([1]), [a, b])[0] is b
    for lease in leases:
        lease.close()
        lease.close()  # idempotent
    assert a.inflight_requests == 0


def test_prefill_prefers_cached_prefix_unless_its_queue_is_longer() -> None:
    prompt = list(range(40))
    cached, other = worker("cached"), worker("other")
    cached.prefix.apply(SimStatus(1, True, page_hashes(prompt, 4)[:8], []))  # 32 of 40 tokens cached
    policy = create_policy("prefix_aware")
    assert policy.rank_prefill(RouteRequest(prompt), [other, cached])[0] is cached
    cached.load.queued_prefill_tokens = 200
    assert policy.rank_prefill(RouteRequest(prompt), [other, cached])[0] is other


def test_prefill_counts_tokens_in_flight_so_a_burst_spreads() -> None:
    workers = [worker(f"p{i}") for i in range(4)]
    policy = create_policy("prefix_aware")
    chosen = []
    for group in range(4):  # four different long prompts at once, before any event
        request = RouteRequest([group] * 64)
        first = policy.rank_prefill(request, workers)[0]
        first.lease(request.uncached_tokens(first), request.page_hashes(4))
        chosen.append(first.id)
    assert sorted(chosen) == ["p0", "p1", "p2", "p3"]
    request = RouteRequest([2] * 64 + [9])  # a follower of group 2 sticks to its worker
    assert policy.rank_prefill(request, workers)[0].id == chosen[2]


def test_round_robin_and_random_ignore_state() -> None:
    workers = [worker(f"p{i}") for i in range(3)]
    rr = create_policy("round_robin")
    assert [rr.rank_prefill(RouteRequest([1]), workers)[0].id for _ in range(4)] == ["p0", "p1", "p2", "p0"]
    rng = create_policy("random", seed=1)
    picks = {rng.rank_decode(RouteRequest([1]), workers)[0].id for _ in range(30)}
    assert picks == {"p0", "p1", "p2"}


def test_prefix_index_events_reset_and_predictions() -> None:
    clock = SimClock()
    index = PrefixIndex(grace=1.0, clock=clock)
    hashes = page_hashes(list(range(16)), 4)
    index.apply(SimStatus(2, False, hashes[:2], []))
    assert index.matched_pages(hashes) == 2 and index.cursor == 2
    index.apply(SimStatus(3, False, [], [hashes[0]]))
    assert index.matched_pages(hashes) == 0  # a chain broken at its root matches nothing
    index.apply(SimStatus(9, True, hashes[:3], []))
    assert index.matched_pages(hashes) == 3 and index.num_pages == 3
    index.predict(hashes)
    assert index.matched_pages(hashes) == 4
    index.unpredict(hashes)
    clock.now += 0.5
    assert index.matched_pages(hashes) == 4  # within the grace period
    clock.now += 1.0
    assert index.matched_pages(hashes) == 3  # never confirmed: lapsed
    index.reset()
    assert index.matched_pages(hashes) == 0 and index.cursor == 0



def test_prefix_index_forgets_predictions_never_confirmed() -> None:
    """Pages predicted for a prefill worker that never computes them (decode prefilled
    the prompt itself) lapse, and are dropped, not kept for good."""
    clock = SimClock()
    index = PrefixIndex(grace=1.0, clock=clock)
    for i in range(2000):  # 20 requests a second, each with its own two pages, for 100 s
        hashes = page_hashes([i, i, i, i, 1, 2, 3, 4], 4)
        index.predict(hashes)
        assert index.matched_pages(hashes) == 2
        index.unpredict(hashes)
        clock.now += 0.05
    assert index.num_predicted <= 2 * 2 * 20  # two grace periods of them, not 4000
    assert index.matched_pages(hashes) == 2  # the latest still in its grace
    clock.now += 1.5
    assert index.matched_pages(hashes) == 0

@pytest.mark.parametrize("arrivals_per_tick", [2, 200])  # steady arrivals, and one burst
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eight_groups_on_four_limited_caches(arrivals_per_tick: int, seed: int) -> None:
    """4 prefill workers whose pools hold the prefixes of 2 of 8 groups; 8 groups x 25
    requests with long shared prefixes in random order."""
    prompts = group_workload(groups=8, per_group=25, prefix_pages=32, page_size=16, seed=seed)
    options = dict(workers=4, capacity_pages=80, page_size=16, arrivals_per_tick=arrivals_per_tick)
    aware = simulate(create_policy("prefix_aware"), prompts, **options)
    round_robin = simulate(create_policy("round_robin"), prompts, **options)
    assert aware.hit_tokens >= 2 * round_robin.hit_tokens
    assert max(aware.requests_per_worker) <= 0.4 * len(prompts)
    assert sum(aware.requests_per_worker) == len(prompts)
