"""Acceptance 2 of the scaling issue: bench/autoscale_demo.py against `epd up`'s local
launcher with the autoscaler on for prefill and decode."""
from __future__ import annotations

from pathlib import Path

from bench.autoscale_demo import run
from tests.e2e.cluster import make_cluster

ROUTER_ARGS = ("--autoscale", "prefill=1:3", "--autoscale", "decode=1:3", "--autoscale-interval", "0.5",
               "--autoscale-up-cooldown", "1", "--autoscale-down-cooldown", "3", "--autoscale-window", "3",
               "--autoscale-prefill-tokens", "512", "--autoscale-decode-running", "6",
               "--autoscale-ttft", "60", "--autoscale-itl", "10", "--autoscale-decode-kv", "0.95")


def test_autoscaler_grows_prefill_then_decode_then_shrinks_both(tmp_path: Path) -> None:
    with make_cluster(tmp_path, num_prefill=1, num_decode=1, router_args=ROUTER_ARGS) as cluster:
        result = run(cluster.http_url, cluster.grpc_address, scale=1.0, silence_timeout_s=90)
    marks, decisions = result["marks"], result["decisions"]
    assert not result["failures"], result["failures"][:3]
    def grew(pool: str, start: float, end: float) -> bool:
        return any(d["pool"] == pool and d["to"] > d["from"] and start <= d["time"] <= end for d in decisions)
    assert grew("prefill", marks["start"], marks["generations"]), decisions
    assert grew("decode", marks["generations"], marks["silence"]), decisions
    assert result["settled"], decisions  # both back at 1, nothing draining
    assert all(d["source"] == "autoscaler" and d["inputs"] for d in decisions)
    downs = [d for d in decisions if d["to"] < d["from"]]
    assert {d["pool"] for d in downs} == {"prefill", "decode"}
