"""Pools grow and shrink at run time under `epd up`'s launcher (deploy/local.py):
`epd scale` adds a worker that takes traffic, and removing one under load drains it:
zero failed requests, every output equal to the offline engine's, no page held after."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.cluster import by_role, cluster_status, make_cluster, wait_for
from tests.e2e.load import SteadyLoad, offline, prompts

MAX_TOKENS = 24
# Fresh prompts per phase: a prompt decode has cached is prefilled there, not by the pool.
REQUESTS = {"decode": prompts(21, 64), "prefill": prompts(22, 320)}


@pytest.fixture(scope="module")
def expected() -> dict[str, list[list[int]]]:
    return {pool: offline(None, requests, MAX_TOKENS) for pool, requests in REQUESTS.items()}


def epd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def served_by(url: str, worker_id: str) -> int:
    """Requests the worker has handled, from its own Status (as /cluster shows it)."""
    entry = [e for e in httpx.get(f"{url}/cluster", timeout=5).json() if e["id"] == worker_id]
    return entry[0]["requests_total"] if entry else 0


def assert_nothing_held(url: str) -> None:
    def idle() -> bool:
        workers = [w for w in httpx.get(f"{url}/cluster", timeout=5).json() if w["healthy"]]
        return all(w["kv_pages_free"] + w["kv_pages_cached"] == w["kv_pages_total"] and w["running"] == 0
                   for w in workers if w["role"] in ("prefill", "decode"))
    wait_for(idle, 15)


def grow_then_shrink(url: str, grpc_address: str, pool: str, expected: dict[str, list[list[int]]]) -> None:
    """Scale `pool` from 1 to 2 under load, see the new worker take traffic, scale back
    to 1 while both serve: nothing fails, nothing differs."""
    with SteadyLoad(grpc_address, REQUESTS[pool], MAX_TOKENS) as load:
        start = time.monotonic()
        grown = epd("scale", pool, "2", "--router", url, "--timeout", "60")
        assert grown.returncode == 0, grown.stderr
        workers = httpx.get(f"{url}/admin/pools", timeout=5).json()["pools"][pool]["workers"]
        assert len(workers) == 2, workers
        new = max(workers, key=lambda w: int(w.rsplit("-", 1)[1]))
        wait_for(lambda: served_by(url, new) > 0, max(1.0, 60 - (time.monotonic() - start)))
        old_served = {w: served_by(url, w) for w in workers}
        wait_for(lambda: all(served_by(url, w) > old_served[w] for w in workers), 30)  # both busy
        shrunk = epd("scale", pool, "1", "--router", url, "--timeout", "90")
        assert shrunk.returncode == 0, shrunk.stderr
        time.sleep(1.0)  # the survivor keeps serving
    assert len(load.outcomes) > 20
    assert not load.failures, load.failures[:3]
    assert not load.mismatches(expected[pool])
    pools = httpx.get(f"{url}/admin/pools", timeout=5).json()
    assert len(pools["pools"][pool]["workers"]) == 1 and not pools["pools"][pool]["draining"]
    assert [d["to"] for d in pools["decisions"] if d["pool"] == pool][-2:] == [2, 1]
    assert len(by_role(httpx.get(f"{url}/cluster", timeout=5).json(), pool)) == 1
    assert_nothing_held(url)


def test_scale_decode_and_prefill_under_load_without_ray(tmp_path: Path, expected: dict[str, list[list[int]]]) -> None:
    with make_cluster(tmp_path, num_prefill=1, num_decode=1) as cluster:
        grow_then_shrink(cluster.http_url, cluster.grpc_address, "decode", expected)
        grow_then_shrink(cluster.http_url, cluster.grpc_address, "prefill", expected)
        # The drained workers exited on their own, and nothing took their exit for a crash.
        assert cluster.retired and all(cluster.processes[n].poll() is not None for n in cluster.retired)
        cluster.check_alive()


def test_epd_scale_bad_input_changes_nothing(tmp_path: Path) -> None:
    with make_cluster(tmp_path, num_prefill=1, num_decode=1, router_args=("--autoscale", "prefill=1:2")) as cluster:
        url = cluster.http_url
        before = httpx.get(f"{url}/admin/pools", timeout=5).json()
        cases = {("scale", "vision", "2"): "unknown pool", ("scale", "decode", "-1"): ">= 0",
                 ("scale", "prefill", "3"): "between 1 and 2", ("scale", "decode", "0"): "at least 1",
                 ("scale", "decode", "two"): "invalid int"}
        for args, message in cases.items():
            result = epd(*args, "--router", url, "--timeout", "5")
            assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        unreachable = epd("scale", "decode", "2", "--router", "http://127.0.0.1:9", "--timeout", "5")
        assert unreachable.returncode == 2 and "cannot reach the router" in unreachable.stderr
        after = httpx.get(f"{url}/admin/pools", timeout=5).json()
        assert after == before and len(cluster.processes) == 3  # nothing started or stopped
        bad = httpx.post(f"{url}/admin/pools/decode", json={"replicas": "2"}, timeout=5)
        assert bad.status_code == 400 and "integer" in bad.json()["error"]["message"]
