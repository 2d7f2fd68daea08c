"""Acceptance 1 of issue 14: 2 prefill + 2 decode workers serve 500 streaming greedy
requests at concurrency 32 while one prefill and one decode worker (chosen by the
seed, at seeded moments) are SIGKILLed and restarted. Every request completes, every
output equals the offline engine's, and afterwards every worker's pages are free or
held by its prefix cache."""
from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.chaos.conftest import MAX_TOKENS, POOL
from tests.chaos.harness import ChaosCluster, Reference, StreamingLoad, assert_all_correct, assert_pages_clean, rng_for, wait_for

pytestmark = pytest.mark.timeout(400)
TOTAL, CONCURRENCY = 500, 32  # two and a half times over the pool


def _router_counter(cluster: ChaosCluster, name: str) -> float:
    text = httpx.get(f"{cluster.http_url}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_kill_and_restart_a_prefill_and_a_decode_worker_under_load(cluster: ChaosCluster, reference: Reference) -> None:
    rng = rng_for("kill_restart")
    victims = [rng.choice(["prefill-0", "prefill-1"]), rng.choice(["decode-0", "decode-1"])]
    rng.shuffle(victims)
    moments = sorted(rng.sample(range(40, 200), 2))  # requests completed when each kill lands
    migrated = _router_counter(cluster, "epd_router_migrations_total")
    start = time.monotonic()
    with StreamingLoad(cluster, POOL, MAX_TOKENS, TOTAL, CONCURRENCY) as load:
        for victim, moment in zip(victims, moments):
            wait_for(lambda: load.completed >= moment, 120, 0.01)
            cluster.sigkill(victim)
            print(f"{time.monotonic() - start:6.2f} s: SIGKILL {victim} after {load.completed} requests")
            time.sleep(rng.uniform(0.5, 2.0))
            cluster.restart(victim)
    outcomes = load.join()
    migrated = _router_counter(cluster, "epd_router_migrations_total") - migrated
    print(f"{TOTAL} requests in {time.monotonic() - start:.1f} s; {migrated:.0f} migrated")
    assert_all_correct(outcomes, reference, TOTAL)
    assert migrated >= 1  # the decode kill cut streams mid-way: they moved, and did not fail
    for victim in victims:  # restarted, re-registered, back in rotation
        cluster.wait_routable(victim)
    assert_pages_clean(cluster)
