"""Transfer connections dropped mid-transfer (the tcp backend's drop hook resets the
connection a prefill worker is writing a prompt's KV on, at seeded moments), under
streaming load: the decode worker sees the attempt fail and prefills elsewhere, the
prefill worker reconnects for the next prompt, every output equals the offline
engine's and no page is left held."""
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


async def _sum(cluster: ChaosCluster, names: tuple[str, ...], metric: str) -> float:
    values = [await worker_metrics(cluster, name) for name in names]
    return sum(total(v, metric) for v in values)


def test_connections_dropped_mid_transfer_fail_over(cluster: ChaosCluster, reference: Reference) -> None:
    asyncio.run(flush_caches(cluster))  # every prompt prefills remotely again
    rng = rng_for("drops")
    failures_before = asyncio.run(_sum(cluster, DECODES, "epd_worker_remote_prefill_failures_total"))
    delivered_before = asyncio.run(_sum(cluster, PREFILLS, "epd_worker_kv_ship_delivered_total"))
    dropped: list[str] = []
    with StreamingLoad(cluster, POOL, MAX_TOKENS, LIMIT, CONCURRENCY) as load:
        for _ in range(DROPS):
            time.sleep(rng.uniform(0.2, 1.0))
            victim = rng.choice(PREFILLS)
            trigger = cluster.fault_file(victim, "drop")
            trigger.touch()
            wait_for(lambda: not trigger.exists(), 30, 0.02)  # consumed: a connection reset mid-write
            dropped.append(victim)
        wait_for(lambda: load.completed >= MIN_TOTAL, 120, 0.05)
        load.stop()
    outcomes = load.join()
    print(f"dropped transfer connections of {dropped}; {len(outcomes)} requests")
    assert len(outcomes) < LIMIT, "the load ran out of requests before it was stopped: raise LIMIT"
    assert_all_correct(outcomes, reference, len(outcomes))
    failures = asyncio.run(_sum(cluster, DECODES, "epd_worker_remote_prefill_failures_total")) - failures_before
    delivered = asyncio.run(_sum(cluster, PREFILLS, "epd_worker_kv_ship_delivered_total")) - delivered_before
    assert failures >= DROPS, failures  # each drop failed at least the attempt it cut
    assert delivered > len(outcomes) // 2, delivered  # and the prefill workers kept shipping, over new connections
    assert_pages_clean(cluster)
