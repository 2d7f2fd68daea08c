"""Acceptance 2 of issue 14: a transfer peer that stalls. A prefill worker stops sending
KV mid-transfer (its connections stay up and say nothing: the tcp backend's stall hook)
for longer than the transfer timeout, under steady streaming load.

- Its requests fail over to the other prefill worker (or a local prefill) within the
  configured transfer timeout: no request takes longer than that timeout plus the
  longest an undisturbed request took (its own service time), plus scheduling slack.
- The router's circuit breaker takes the stalled worker out (it still answers Status),
  so throughput recovers while the stall goes on.
- Every output equals the offline engine's; afterwards the worker serves again and no
  page is held anywhere.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.conftest import MAX_TOKENS, POOL, TRANSFER_TIMEOUT_S
from tests.chaos.harness import (ChaosCluster, Reference, StreamingLoad, assert_all_correct, assert_pages_clean,
                                 flush_caches, rng_for, wait_for)

pytestmark = pytest.mark.timeout(300)
CONCURRENCY = 16
BASELINE = 60
LIMIT = 20_000  # the load runs until TAIL_S after the stall ends, however fast the machine
TAIL_S = 3.0
STALL_S = 12.0  # three transfer timeouts, and past the breaker's 5 s cool-down (a probe during it)
SLACK_S = 2.0  # process scheduling on a loaded 2-core machine


def _rate(outcomes: list, start: float, end: float) -> float:
    return sum(start <= o.ended < end for o in outcomes) / (end - start)


def test_a_stalled_prefill_fails_over_within_the_timeout_and_throughput_recovers(
        cluster: ChaosCluster, reference: Reference) -> None:
    asyncio.run(flush_caches(cluster))  # every prompt of the pool misses again: remote prefills
    victim = rng_for("stall").choice(["prefill-0", "prefill-1"])
    trigger = cluster.fault_file(victim, "stall")
    seen_open = False
    with StreamingLoad(cluster, POOL, MAX_TOKENS, LIMIT, CONCURRENCY, http_every=0) as load:
        wait_for(lambda: load.completed >= BASELINE, 120, 0.01)
        trigger.touch()
        stalled_at = time.monotonic()
        while time.monotonic() - stalled_at < STALL_S:
            seen_open = seen_open or cluster.worker(victim)["breaker"] == "open"
            time.sleep(0.2)
        trigger.unlink()
        resumed_at = time.monotonic()
        time.sleep(TAIL_S)
        load.stop()
    outcomes = load.join()
    assert len(outcomes) < LIMIT, "the load ran out of requests before it was stopped: raise LIMIT"
    assert_all_correct(outcomes, reference, len(outcomes))
    assert resumed_at < max(o.ended for o in outcomes) - 1.0
    baseline = [o for o in outcomes if o.ended < stalled_at]
    service_s = max(o.latency for o in baseline)
    worst = max(outcomes, key=lambda o: o.latency)
    print(f"stalled {victim} {STALL_S:.0f} s; undisturbed requests took up to {service_s:.2f} s, "
          f"the slowest of all {worst.latency:.2f} s")
    assert worst.latency <= TRANSFER_TIMEOUT_S + service_s + SLACK_S, worst
    # The breaker took the stalled worker out: once the requests caught in the stall had
    # failed over, new ones no longer waited on it (but for the breaker's probes, one per
    # cool-down), and throughput came back with one prefill worker doing the work of two.
    assert seen_open
    settled = stalled_at + TRANSFER_TIMEOUT_S + SLACK_S
    late = [o for o in outcomes if settled <= o.started < resumed_at]
    slow = [o for o in late if o.latency > TRANSFER_TIMEOUT_S]
    before = _rate(outcomes, baseline[0].ended, stalled_at)
    during = _rate(outcomes, settled, resumed_at)
    print(f"throughput before the stall {before:.1f} requests/s, during it (after the failover) {during:.1f}; "
          f"{len(slow)} of {len(late)} requests started then waited on the stalled worker")
    assert len(late) > 20 and len(slow) <= 2, [o.latency for o in slow]
    assert during >= 0.3 * before, (before, during)
    # Once it sends again, a probe closes its breaker and it takes requests again. The
    # probe is a request let through after the breaker's cool-down, so the load must last
    # until then (a fixed 40 requests at this machine's 40 requests/s ended before it).
    with StreamingLoad(cluster, POOL, MAX_TOKENS, LIMIT, 4, http_every=0) as after:
        cluster.wait_routable(victim, timeout_s=30, closed=True)
        after.stop()
    tail = after.join()
    assert 0 < len(tail) < LIMIT
    assert_all_correct(tail, reference, len(tail))
    assert_pages_clean(cluster)
