"""The autoscaler's rule and the pool manager's checks, without workers."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from router.autoscaler import Autoscaler, RecentLatency, Window
from router.config import RouterConfig
from router.pools import PoolError, PoolManager
from router.registry import WorkerRegistry


def test_window_keeps_only_recent_samples() -> None:
    window = Window(10.0)
    for i in range(100):
        window.add(float(i), now=float(i))
    assert window.p90(now=99.0) == 98.0  # samples 89..99 remain
    assert window.p90(now=1000.0) == 0.0


@pytest.mark.parametrize("current,u,want", [(1, 5.0, 3), (2, 1.05, 2), (2, 1.3, 3), (3, 0.0, 1),
                                            (3, 0.5, 2), (0, 2.0, 1), (1, 0.95, 1)])
def test_desired_is_proportional_clamped_and_tolerant(current: int, u: float, want: int) -> None:
    config = RouterConfig(autoscale=("prefill=1:3",))
    scaler = Autoscaler(config, WorkerRegistry(config), None, RecentLatency(30), CollectorRegistry())
    assert scaler.desired("prefill", current, {"u_tokens": u, "queued": 1e9}) == want


def test_pool_manager_refuses_bad_requests() -> None:
    config = RouterConfig(autoscale=("prefill=1:2",))
    pools = PoolManager(config, WorkerRegistry(config))
    for pool, replicas, status, text in [("vision", 1, 404, "unknown pool"), ("decode", -1, 400, ">= 0"),
                                         ("decode", 0, 400, "at least 1"), ("prefill", 3, 400, "between 1 and 2"),
                                         ("decode", "2", 400, "integer"), ("decode", True, 400, "integer"),
                                         ("decode", 2, 409, "no launcher")]:
        with pytest.raises(PoolError, match=text) as caught:
            pools.check(pool, replicas)
        assert caught.value.http_status == status
