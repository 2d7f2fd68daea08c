"""Client disconnects and dead workers, through a real cluster."""
from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from proto import epd_pb2 as pb
from tests.e2e.cluster import by_role, cluster_status, grpc_generate, make_cluster, wait_for

pytestmark = pytest.mark.timeout(300)


def _idle(entries: list[dict]) -> bool:
    return all(e["running"] == 0 and e["waiting"] == 0 for e in entries)


def _no_leak(entries: list[dict]) -> bool:
    return all(e["kv_pages_free"] == e["kv_pages_total"] - e["kv_pages_cached"] for e in entries)


def test_client_disconnect_aborts_on_decode_and_prefill(tmp_path) -> None:  # noqa: ANN001
    # A slow prefill (16-token chunks over a long prompt) so the disconnect lands while the
    # prefill still runs; then one while decoding.
    with make_cluster(tmp_path, num_prefill=1, num_decode=1,
                      worker_args=("--max-num-batched-tokens", "16")) as cluster:
        rng = random.Random(3)
        prompt = [rng.randrange(3, 500) for _ in range(900)]
        model = httpx.get(f"{cluster.http_url}/v1/models", timeout=5).json()["data"][0]["id"]
        body = {"model": model, "prompt": prompt, "max_tokens": 100, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", f"{cluster.http_url}/v1/completions", json=body) as response:
                assert response.status_code == 200
                wait_for(lambda: by_role(cluster_status(cluster), "prefill")[0]["running"] > 0, 20, 0.02)
            closed = time.monotonic()
        wait_for(lambda: _idle(cluster_status(cluster)), 5, 0.05)
        assert time.monotonic() - closed < 1.0 + 0.5  # 0.5 s allowance for the status polls themselves
        # Now a disconnect while decoding.
        body["prompt"], body["max_tokens"] = prompt[:100], 500
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", f"{cluster.http_url}/v1/completions", json=body) as response:
                lines = response.iter_lines()
                for _ in range(5):
                    next(lines)
                assert by_role(cluster_status(cluster), "decode")[0]["running"] == 1
            closed = time.monotonic()
        wait_for(lambda: _idle(cluster_status(cluster)), 5, 0.05)
        assert time.monotonic() - closed < 1.5
        assert _no_leak(cluster_status(cluster))


async def _many(address: str, count: int) -> list:
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(100, 600))] for _ in range(count)]
    params = pb.SamplingParams(max_tokens=8, temperature=0.0)
    return await asyncio.gather(*(grpc_generate(address, p, params) for p in prompts), return_exceptions=True)


def test_dead_prefill_worker_is_retried_and_removed(tmp_path) -> None:  # noqa: ANN001
    with make_cluster(tmp_path, num_prefill=2, num_decode=1,
                      worker_args=("--max-num-batched-tokens", "64")) as cluster:
        async def scenario() -> list:
            task = asyncio.create_task(_many(cluster.grpc_address, 24))
            await asyncio.sleep(1.0)
            cluster.kill("prefill-0")
            return await task

        killed_at = time.monotonic()
        results = asyncio.run(scenario())
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert all(r[2].reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP) for r in results)
        took = wait_for(lambda: not next(e for e in cluster_status(cluster) if e["id"] == "prefill-0")["healthy"], 5)
        assert time.monotonic() - killed_at < 5 + took + 30  # removal itself is bounded by the wait_for above
        # New requests avoid the dead worker and succeed.
        assert not [r for r in asyncio.run(_many(cluster.grpc_address, 4)) if isinstance(r, BaseException)]
        assert _no_leak([e for e in cluster_status(cluster) if e["healthy"]])


def test_dead_decode_worker_before_first_token_is_retried(tmp_path) -> None:  # noqa: ANN001
    with make_cluster(tmp_path, num_prefill=1, num_decode=2,
                      worker_args=("--max-num-batched-tokens", "32")) as cluster:
        async def scenario() -> list:
            task = asyncio.create_task(_many(cluster.grpc_address, 16))
            await asyncio.sleep(0.5)
            cluster.kill("decode-0")
            killed = time.monotonic()
            results = await task
            return [results, killed]

        results, killed = asyncio.run(scenario())
        removed_after = wait_for(
            lambda: not next(e for e in cluster_status(cluster) if e["id"] == "decode-0")["healthy"], 5)
        assert time.monotonic() - killed - removed_after < 5 or removed_after < 5
        ok = [r for r in results if not isinstance(r, BaseException) and r[2].reason != pb.FINISH_REASON_ERROR]
        # Requests that had not yet received a token were retried on decode-1; only those
        # already streaming from decode-0 may fail.
        assert len(ok) >= 8, results
        assert not [r for r in asyncio.run(_many(cluster.grpc_address, 4)) if isinstance(r, BaseException)]
