"""`epd bench` as a user runs it (a subprocess) against a real 1P1D tiny-model cluster:
the summary is printed, results.json and the PNGs are written, and the numbers agree
with what was sent (request and token counts, the router's own request counter) and
with themselves (percentiles ordered, no negative times)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.client.distributions import Distribution
from bench.client.workloads import WorkloadSpec, build
from deploy.local import LocalCluster
from tests.e2e.cluster import make_cluster

pytestmark = pytest.mark.timeout(300)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with make_cluster(tmp_path_factory.mktemp("bench")) as running:
        yield running


def ok_requests(cluster: LocalCluster) -> float:
    text = httpx.get(f"{cluster.http_url}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "epd_router_requests"
               for s in f.samples if s.name == "epd_router_requests_total" and s.labels.get("status") == "ok")


def epd_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.cli", "bench", *args], capture_output=True, text=True,
                          timeout=240)


def check_stats(stats: dict[str, Any], values: list[float]) -> None:
    """The summary's percentiles are those of the per-request values, in order."""
    assert stats["count"] == len(values) and min(values) >= 0
    keys = ("min", "p50", "p90", "p99", "max")
    assert [stats[k] for k in keys] == sorted(stats[k] for k in keys)
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert stats[key] == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-12)


def test_http_sweep_writes_summary_json_and_plots(cluster: LocalCluster, tmp_path: Path) -> None:
    before = ok_requests(cluster)
    out = tmp_path / "results"
    done = epd_bench("--url", cluster.http_url, "--num-requests", "12", "--input-len", "uniform:8:40",
                     "--output-len", "6", "--request-rate-sweep", "4,16", "--slo", "ttft=30,itl=10",
                     "--seed", "3", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("requests: 12 ok, 0 failed of 12 sent") == 2, done.stdout
    assert "goodput" in done.stdout and "TTFT (ms)" in done.stdout
    for name in ("latency_cdf.png", "throughput_vs_rate.png", "slo_attainment_vs_rate.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    body = json.loads((out / "results.json").read_text())
    sent = build(WorkloadSpec(num_requests=12, input_len=Distribution.parse("uniform:8:40"),
                              output_len=Distribution.parse("6"), seed=3))
    assert [run["summary"]["request_rate"] for run in body["runs"]] == [4.0, 16.0]
    for run in body["runs"]:
        summary, requests = run["summary"], run["requests"]
        assert summary["sent"] == summary["completed"] == len(requests) == 12 and summary["errors"] == {}
        # Each request's prompt and output, as the router counted them, are what was sent.
        lengths = sorted((r["conversation"], r["prompt_tokens"], r["output_tokens"]) for r in requests)
        assert lengths == [(i, len(c.turns[0].token_ids), 6) for i, c in enumerate(sent)]
        assert summary["output_tokens"] == 72 and summary["prompt_tokens"] == sum(p for _, p, _ in lengths)
        for key in ("ttft", "e2e", "tpot"):
            check_stats(summary[key], [r[f"{key}_s"] for r in requests])
        assert all(r["ttft_s"] <= r["e2e_s"] and r["start_s"] >= 0 and r["lateness_s"] >= 0 for r in requests)
        assert summary["good"] == 12 and summary["slo_attainment"] == 1.0
        assert summary["request_throughput"] == pytest.approx(12 / summary["duration_s"])
    assert ok_requests(cluster) - before == 24  # the router saw exactly the requests sent


def test_grpc_closed_loop_shared_prefix_and_multi_turn(cluster: LocalCluster, tmp_path: Path) -> None:
    grpc_url = cluster.grpc_address
    done = epd_bench("--url", grpc_url, "--grpc", "--workload", "shared-prefix", "--num-requests", "8",
                     "--prefix-groups", "2", "--prefix-len", "32", "--input-len", "8", "--output-len", "4",
                     "--concurrency", "3", "--no-progress", "--output-dir", str(tmp_path / "prefix"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "prefix" / "results.json").read_text())["runs"][0]["summary"]
    assert (summary["completed"], summary["prompt_tokens"], summary["output_tokens"]) == (8, 8 * 40, 32)
    assert summary["concurrency"] == 3 and summary["itl"]["min"] >= 0
    done = epd_bench("--url", cluster.http_url, "--workload", "multi-turn", "--num-requests", "3", "--turns", "3",
                     "--input-len", "5", "--output-len", "4", "--concurrency", "2", "--no-progress",
                     "--output-dir", str(tmp_path / "turns"))
    assert done.returncode == 0, done.stderr
    requests = json.loads((tmp_path / "turns" / "results.json").read_text())["runs"][0]["requests"]
    assert len(requests) == 9 and all(r["error"] is None and r["output_tokens"] == 4 for r in requests)
    by_turn = {(r["conversation"], r["turn"]): r["prompt_tokens"] for r in requests}
    for conversation in range(3):  # each turn carries the earlier ones: prompts grow
        assert by_turn[conversation, 0] < by_turn[conversation, 1] < by_turn[conversation, 2]


def test_dataset_file_and_bad_flags(cluster: LocalCluster, tmp_path: Path) -> None:
    dataset = tmp_path / "chats.jsonl"
    rows = [{"conversations": [{"from": "human", "value": f"Question number {i}?"},
                               {"from": "gpt", "value": "An answer."}]} for i in range(4)]
    dataset.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    done = epd_bench("--url", cluster.http_url, "--dataset", str(dataset), "--num-requests", "4",
                     "--output-len", "3", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "requests: 4 ok, 0 failed of 4 sent" in done.stdout
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text('{"conversations": [{"from": "robot", "value": "hi"}]}\n')
    for args, message in ((["--request-rate", "-1"], "must be positive"),
                          (["--input-len", "gauss:3"], "unknown distribution"),
                          (["--slo", "ttft=fast"], "not a number"),
                          (["--request-rate", "2", "--concurrency", "2"], "not allowed with"),
                          (["--dataset", str(bad_file)], "unknown speaker")):
        failed = epd_bench("--url", cluster.http_url, *args)
        assert failed.returncode == 2 and message in failed.stderr, (args, failed.stderr)
    assert epd_bench("--url", "127.0.0.1:1").returncode == 2  # not an http URL without --grpc
