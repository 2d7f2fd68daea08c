"""Transfer connections dropped mid-transfer (the tcp backend's drop hook resets the
connection a prefill worker is writing a prompt's KV on, at seeded moments), under
streaming load: the decode worker sees the attempt fail and prefills elsewhere, the
prefill worker reconnects for the next prompt, every output equals the offline
engine's and no page is left held.

"Reconnects" is checked per drop: the connection a drop cut goes from one prefill worker
to one decode worker (its transfer address, the `decode` label of the prefill worker's
ship counters); after the cut attempt ended undelivered, that prefill worker must
deliver KV to that decode worker again, which it can only do over a new connection.
Counting ships against the number of requests would not say this: the pool's prompts
repeat once the load has sent more than len(POOL), and a repeat the decode worker still
has cached is prefilled there (its uncached part is below the local threshold), so the
share of requests that need a remote prefill falls as the run goes on (and the run's
length depends on timing: it lasts until every drop has been consumed)."""
from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.conftest import MAX_TOKENS, POOL
from tests.chaos.harness import (ChaosCluster, Reference, StreamingLoad, assert_all_correct, assert_pages_clean,
                                 flush_caches, rng_for, total, wait_for, worker_metrics)

pytestmark = pytest.mark.timeout(300)
DROPS, CONCURRENCY = 6, 16
LIMIT, MIN_TOTAL = 20_000, 240  # the load runs until every drop is done (and at least MIN_TOTAL requests)
DECODES, PREFILLS = ("decode-0", "decode-1"), ("prefill-0", "prefill-1")
DELIVERED, UNDELIVERED = "epd_worker_kv_ship_delivered_total", ("epd_worker_kv_ship_failed_total",
                                                                   "epd_worker_kv_ship_cancelled_total")
CONSUME_S = 30.0  # a drop is consumed by the victim's next KV write (within its breaker's cooldown)
CUT_S = 10.0  # the cut attempt ends undelivered within this long (it fails at once in practice)
# A prefill worker ships to the decode worker again within this long of the drop; it may
# have to wait out its circuit breaker's cooldown first (5 s: a reset connection fails
# every attempt in flight on it, which can be the 3 failures in a row that open it).
RESHIP_S = 60.0


async def _sum(cluster: ChaosCluster, names: tuple[str, ...], metric: str) -> float:
    values = [await worker_metrics(cluster, name) for name in names]
    return sum(total(v, metric) for v in values)


def _ships(cluster: ChaosCluster, name: str) -> dict[str, tuple[float, float]]:
    """A prefill worker's (delivered, undelivered) ships per destination (the decode
    worker's transfer address)."""
    values = asyncio.run(worker_metrics(cluster, name))
    return {peer: (value, sum(values.get((u, peer), 0.0) for u in UNDELIVERED))
            for (metric, peer), value in values.items() if metric == DELIVERED and peer}


def _cut(cluster: ChaosCluster, victim: str, before: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The destinations of `victim` whose attempt the drop cut (their undelivered count
    went up), each with its delivered count once that was seen."""
    found: dict[str, float] = {}

    def seen() -> bool:
        now = _ships(cluster, victim)
        found.update({d: delivered for d, (delivered, undelivered) in now.items()
                      if undelivered > before.get(d, (0.0, 0.0))[1]})
        return bool(found)
    try:
        wait_for(seen, CUT_S, 0.02)
    except TimeoutError:
        raise AssertionError(f"a drop of {victim} was consumed but none of its ships ended undelivered "
                             f"within {CUT_S:g} s") from None
    return found


def test_connections_dropped_mid_transfer_fail_over(cluster: ChaosCluster, reference: Reference) -> None:
    asyncio.run(flush_caches(cluster))  # every prompt prefills remotely again
    rng = rng_for("drops")
    failures_before = asyncio.run(_sum(cluster, DECODES, "epd_worker_remote_prefill_failures_total"))
    attempts_before = asyncio.run(_sum(cluster, DECODES, "epd_worker_remote_prefill_attempts_total"))
    delivered_before = asyncio.run(_sum(cluster, PREFILLS, DELIVERED))
    dropped: list[str] = []
    cuts: list[tuple[str, str, float]] = []  # (prefill worker, destination, its delivered count after the cut)
    with StreamingLoad(cluster, POOL, MAX_TOKENS, LIMIT, CONCURRENCY) as load:
        for _ in range(DROPS):
            time.sleep(rng.uniform(0.2, 1.0))
            victim = rng.choice(PREFILLS)
            before = _ships(cluster, victim)
            trigger = cluster.fault_file(victim, "drop")
            trigger.touch()
            try:  # consumed: a connection reset mid-write
                wait_for(lambda: not trigger.exists(), CONSUME_S, 0.02)
            except TimeoutError:
                raise AssertionError(f"drop {len(dropped) + 1} ({victim}, after {dropped}) not consumed within "
                                     f"{CONSUME_S:g} s: {victim} wrote no KV meanwhile") from None
            dropped.append(victim)
            cuts.extend((victim, destination, delivered)
                        for destination, delivered in _cut(cluster, victim, before).items())

        def reshipped() -> list[tuple[str, str, float]]:
            """The cuts after which the prefill worker has not delivered to that
            destination yet."""
            now = {name: _ships(cluster, name) for name in set(dropped)}
            return [(name, d, n) for name, d, n in cuts if now[name].get(d, (0.0, 0.0))[0] <= n]
        try:
            wait_for(lambda: not reshipped(), RESHIP_S, 0.1)
        except TimeoutError:
            raise AssertionError(f"no KV delivered over a new connection {RESHIP_S:g} s after these drops "
                                 f"(prefill worker, destination, delivered count at the cut): {reshipped()}") from None
        wait_for(lambda: load.completed >= MIN_TOTAL, 120, 0.05)
        load.stop()
    outcomes = load.join()
    print(f"dropped transfer connections of {dropped}; {len(outcomes)} requests; cut {len(cuts)} destination(s)")
    assert len(outcomes) < LIMIT, "the load ran out of requests before it was stopped: raise LIMIT"
    assert_all_correct(outcomes, reference, len(outcomes))
    failures = asyncio.run(_sum(cluster, DECODES, "epd_worker_remote_prefill_failures_total")) - failures_before
    attempts = asyncio.run(_sum(cluster, DECODES, "epd_worker_remote_prefill_attempts_total")) - attempts_before
    delivered = asyncio.run(_sum(cluster, PREFILLS, DELIVERED)) - delivered_before
    assert failures >= DROPS, failures  # each drop failed at least the attempt it cut
    # Every remote prefill the decode workers got (an attempt that did not fail) was
    # shipped by a prefill worker: none was taken as done without its KV.
    assert delivered >= attempts - failures > 0, (delivered, attempts, failures)
    assert_pages_clean(cluster)
