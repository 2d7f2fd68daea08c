"""`epd up --ray`: the router and workers as Ray actors on a real local Ray cluster.

Pools grow and drain under load as without Ray; placement follows --placement-strategy
over two Ray nodes; a killed worker actor is restarted by Ray, re-registers, and gets
no request before it is ready."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")

from deploy.local import ClusterSpec  # noqa: E402
from deploy.ray_launcher import RayCluster  # noqa: E402
from tests.e2e.cluster import by_role, wait_for  # noqa: E402
from tests.e2e.load import SteadyLoad, offline, prompts  # noqa: E402
from tests.e2e.test_scaling import MAX_TOKENS, REQUESTS, epd, grow_then_shrink  # noqa: E402
from worker.config import free_port  # noqa: E402

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only


@pytest.fixture(scope="module")
def expected() -> dict[str, list[list[int]]]:
    return {pool: offline(None, requests, MAX_TOKENS) for pool, requests in REQUESTS.items()}


def test_epd_up_ray_local_scales_both_pools_then_epd_down(tmp_path: Path, expected: dict) -> None:  # noqa: ANN001
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    up = subprocess.Popen([sys.executable, "-m", "deploy.cli", "up", "--ray", "local", "--prefill", "1",
                           "--decode", "1", "--port", str(port), "--grpc-port", str(grpc_port),
                           "--log-dir", str(tmp_path / "logs")], env=env,
                          stdout=(tmp_path / "up.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url) or up.poll() is not None, 180, 0.5)
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        grow_then_shrink(url, f"127.0.0.1:{grpc_port}", "decode", expected)
        grow_then_shrink(url, f"127.0.0.1:{grpc_port}", "prefill", expected)
        down = subprocess.run([sys.executable, "-m", "deploy.cli", "down", "--port", str(port)], env=env,
                              capture_output=True, text=True, timeout=90)
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _spec(tmp_path: Path, **overrides: object) -> ClusterSpec:
    return ClusterSpec(port=free_port(), grpc_port=free_port(), log_dir=str(tmp_path / "logs"), **overrides)


@pytest.mark.parametrize("strategy", ["spread", "pack"])
def test_placement_over_two_nodes(tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.cluster_utils import Cluster
    base = tempfile.mkdtemp(prefix="epd-ray-")  # short: Ray's socket paths have a length limit
    monkeypatch.setenv("RAY_TMPDIR", base)  # Ray's own files (it writes the address file there)
    temp = os.path.join(base, "ray")
    os.makedirs(temp)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False,
                                                          "temp_dir": temp})
    nodes.add_node(num_cpus=4)
    nodes.wait_for_nodes()
    cluster = RayCluster(_spec(tmp_path, num_prefill=2, num_decode=2), nodes.address, strategy)
    try:
        cluster.start()
        where = {name: cluster.node_of(name) for name in ("prefill-0", "prefill-1", "decode-0", "decode-1")}
        if strategy == "spread":  # each pool on both nodes
            assert where["prefill-0"] != where["prefill-1"] and where["decode-0"] != where["decode-1"], where
        else:  # everything on one node
            assert len(set(where.values())) == 1, where
        assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 2
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if isinstance(a, dict)} or set(ray.util.list_named_actors())
        assert {"epd-router", "epd-prefill-0", "epd-decode-1"} <= names, names
    finally:
        cluster.stop()
        nodes.shutdown()


def test_killed_worker_actor_is_restarted_and_not_routed_to_before_ready(tmp_path: Path) -> None:
    requests = prompts(31, 48, low=8, high=40)
    want = offline(None, requests, MAX_TOKENS)
    cluster = RayCluster(_spec(tmp_path, num_prefill=0, num_decode=2), "local")
    try:
        cluster.start()
        url = cluster.http_url
        before = cluster.info("decode-1")
        cluster.kill("decode-1")
        wait_for(lambda: not _entry(url, "decode-1")["healthy"], 30, 0.05)
        with SteadyLoad(cluster.grpc_address, requests, MAX_TOKENS, concurrency=4) as load:
            seen = []  # (address, healthy, routed_total) of decode-1 while it comes back
            def back() -> bool:
                entry = _entry(url, "decode-1")
                seen.append((entry["address"], entry["healthy"], entry["routed_total"]))
                return entry["healthy"] and entry["address"] != before["address"]
            wait_for(back, 120, 0.05)
            wait_for(lambda: _entry(url, "decode-1")["routed_total"] > 0, 30)
        after = cluster.info("decode-1")
        assert after["pid"] != before["pid"] and after["id"] == "decode-1"  # Ray restarted it
        assert all(routed == 0 for address, healthy, routed in seen
                   if address == after["address"] and not healthy), seen  # nothing before ready
        assert not load.failures and not load.mismatches(want)
        assert len(by_role(httpx.get(f"{url}/cluster", timeout=5).json(), "decode")) == 2
    finally:
        cluster.stop()


def _entry(url: str, worker_id: str) -> dict:
    return next(e for e in httpx.get(f"{url}/cluster", timeout=5).json() if e["id"] == worker_id)


def test_unreachable_ray_address_is_a_usage_error_and_starts_nothing(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "deploy.cli", "up", "--ray", f"127.0.0.1:{free_port()}",
                             "--port", str(port)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)})
    assert result.returncode == 2 and "cannot reach the Ray cluster" in result.stderr, result.stderr
    assert not list(tmp_path.iterdir())  # no state file: nothing was started
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
