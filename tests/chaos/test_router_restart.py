"""The router SIGKILLed under load and started again. Workers register themselves
(as under Kubernetes or Ray), so the new router learns them from their heartbeats.
While it is down, clients get a clean error at once (gRPC UNAVAILABLE, HTTP connection
refused or reset), never a hang; once it is back, requests succeed with the offline
engine's output; the decode workers aborted the streams that lost their router, so no
page stays held."""
from __future__ import annotations

import time

import pytest

from tests.chaos.conftest import MAX_TOKENS, POOL, WORKERS
from tests.chaos.harness import (ChaosCluster, Reference, StreamingLoad, assert_pages_clean, mismatches, rng_for,
                                 wait_for)

pytestmark = pytest.mark.timeout(300)
# Refused or cut connections; 503 (gRPC UNAVAILABLE too) from the new router before the
# workers' next heartbeat registered them again.
CLEAN_ERRORS = {"UNAVAILABLE", "ConnectError", "RemoteProtocolError", "ReadError", "HTTP 503"}
AFTER = 60  # requests to complete after the restart


def test_router_restart_is_a_clean_error_then_service_again(cluster: ChaosCluster, reference: Reference) -> None:
    rng = rng_for("router_restart")
    with StreamingLoad(cluster, POOL, MAX_TOKENS, 100_000, 8) as load:
        wait_for(lambda: load.completed >= rng.randrange(30, 80), 120, 0.01)
        cluster.sigkill("router")
        killed = time.monotonic()
        time.sleep(rng.uniform(0.5, 1.5))
        cluster.restart("router")
        cluster.wait_ready(120)  # /health: every worker registered again and healthy
        back = time.monotonic()
        print(f"router down for {back - killed:.1f} s")
        wait_for(lambda: sum(o.started > back for o in load.outcomes) >= AFTER, 120, 0.05)
        load.stop()
    outcomes = load.join()
    down = [o for o in outcomes if o.error is not None]
    after = [o for o in outcomes if o.started > back]
    assert down, "no request saw the router down"
    assert {o.error_kind for o in down} <= CLEAN_ERRORS, {o.error for o in down}
    assert all(o.started >= killed - 60 and o.ended - max(o.started, killed) < 5.0 for o in down)  # no hang
    assert all(o.error is None for o in after), [o.error for o in after if o.error][:3]
    assert not mismatches(outcomes, reference)
    assert {w["id"] for w in cluster.workers()} == set(WORKERS)
    assert_pages_clean(cluster)
