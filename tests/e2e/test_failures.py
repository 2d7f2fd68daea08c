"""Client disconnects and dead workers, through a real cluster."""
from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import grpc
import httpx
import pytest

from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from tests.e2e.cluster import by_role, cluster_status, make_cluster, wait_for

pytestmark = pytest.mark.timeout(300)


def _direct_status(cluster, name: str) -> pb.WorkerStatus:  # noqa: ANN001
    async def ask() -> pb.WorkerStatus:
        async with grpc.aio.insecure_channel(cluster.worker_addresses[name]) as channel:
            stub = (pb_grpc.PrefillWorkerStub if name.startswith("prefill") else pb_grpc.DecodeWorkerStub)(channel)
            return await stub.Status(pb.StatusRequest(), timeout=5)
    return asyncio.run(ask())


def _workers_idle(cluster) -> bool:  # noqa: ANN001
    statuses = [_direct_status(cluster, name) for name in ("prefill-0", "decode-0")]
    return all(s.running == 0 and s.waiting == 0 for s in statuses)


def _idle(entries: list[dict]) -> bool:
    return all(e["running"] == 0 and e["waiting"] == 0 for e in entries)


def _no_leak(entries: list[dict]) -> bool:
    return all(e["kv_pages_free"] == e["kv_pages_total"] - e["kv_pages_cached"] for e in entries)


def test_client_disconnect_aborts_on_decode_and_prefill(tmp_path) -> None:  # noqa: ANN001
    # A slow prefill (8-token chunks over a long prompt) so the disconnect lands while the
    # prefill still runs; then one while decoding.
    with make_cluster(tmp_path, num_prefill=1, num_decode=1,
                      worker_args=("--max-num-batched-tokens", "8")) as cluster:
        rng = random.Random(3)
        prompt = [rng.randrange(3, 500) for _ in range(900)]
        model = httpx.get(f"{cluster.http_url}/v1/models", timeout=5).json()["data"][0]["id"]
        body = {"model": model, "prompt": prompt, "max_tokens": 100, "stream": True, "ignore_eos": True}
        # The router answers a stream's headers only with its first token, so the
        # disconnect during prefill goes over a raw socket: send, wait for prefill, close.
        with socket.create_connection((cluster.spec.host, cluster.spec.port), timeout=10) as sock:
            payload = json.dumps(body).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            # Ask the prefill worker itself: the router's view lags by up to 0.5 s.
            wait_for(lambda: _direct_status(cluster, "prefill-0").running > 0, 20, 0.01)
        closed = time.monotonic()
        wait_for(lambda: _workers_idle(cluster), 5, 0.02)
        assert time.monotonic() - closed < 1.0
        # The prefill was aborted part-way, not left to finish.
        assert _direct_status(cluster, "prefill-0").prefill_tokens_total < len(prompt)
        # Now a disconnect while decoding.
        body["prompt"], body["max_tokens"] = prompt[:100], 500
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", f"{cluster.http_url}/v1/completions", json=body) as response:
                lines = response.iter_lines()
                for _ in range(5):
                    next(lines)
                wait_for(lambda: by_role(cluster_status(cluster), "decode")[0]["running"] == 1, 5, 0.05)
            closed = time.monotonic()
        wait_for(lambda: _workers_idle(cluster), 5, 0.02)
        assert time.monotonic() - closed < 1.0
        for name in ("prefill-0", "decode-0"):
            status = _direct_status(cluster, name)
            assert status.kv_pages_free == status.kv_pages_total - status.kv_pages_cached


async def _generate(address: str, prompt: list[int]) -> tuple[list[int], pb.Finished | None, str | None]:
    """Tokens received, the finish (if any) and the RPC error (if any) of one request."""
    tokens: list[int] = []
    async with grpc.aio.insecure_channel(address) as channel:
        request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=8, temperature=0.0))
        request.token_ids.ids.extend(prompt)
        try:
            async for response in pb_grpc.RouterStub(channel).Generate(request, timeout=120):
                if response.HasField("chunk"):
                    tokens.extend(response.chunk.token_ids)
                else:
                    return tokens, response.finished, None
        except grpc.aio.AioRpcError as exc:
            return tokens, None, exc.code().name
    return tokens, None, "stream ended without a finish"


async def _many(address: str, count: int, seed: int = 5) -> list[tuple[list[int], pb.Finished | None, str | None]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(100, 600))] for _ in range(count)]
    return await asyncio.gather(*(_generate(address, p) for p in prompts))


def _succeeded(result: tuple[list[int], pb.Finished | None, str | None]) -> bool:
    tokens, finished, error = result
    return error is None and finished is not None and finished.reason in (
        pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP) and len(tokens) == finished.usage.completion_tokens


async def _seconds_until_unhealthy(cluster, worker_id: str, limit_s: float = 10.0) -> float:  # noqa: ANN001
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() - start < limit_s:
            body = (await client.get(f"{cluster.http_url}/cluster")).json()
            workers = body["workers"] if isinstance(body, dict) else body
            if not next(w for w in workers if w["id"] == worker_id)["healthy"]:
                return time.monotonic() - start
            await asyncio.sleep(0.05)
    return float("inf")


def _kill_during_load(cluster, name: str, requests: int, after_s: float) -> tuple[list, float]:  # noqa: ANN001
    """Send `requests` requests, kill worker `name` after `after_s` seconds; returns the
    results and how long the router took to mark the worker unhealthy."""
    async def scenario() -> tuple[list, float]:
        task = asyncio.create_task(_many(cluster.grpc_address, requests))
        await asyncio.sleep(after_s)
        cluster.kill(name)
        removed_after = await _seconds_until_unhealthy(cluster, name)
        return await task, removed_after
    return asyncio.run(scenario())


def test_dead_prefill_worker_is_retried_and_removed(tmp_path) -> None:  # noqa: ANN001
    with make_cluster(tmp_path, num_prefill=2, num_decode=1,
                      worker_args=("--max-num-batched-tokens", "64")) as cluster:
        results, removed_after = _kill_during_load(cluster, "prefill-0", 24, 1.0)
        assert removed_after < 5.0
        # Decode retried every prefill that died with prefill-0 on prefill-1 (or locally).
        assert all(_succeeded(r) for r in results), [r for r in results if not _succeeded(r)][:3]
        later = asyncio.run(_many(cluster.grpc_address, 4, seed=6))
        assert all(_succeeded(r) for r in later)
        healthy = [e for e in cluster_status(cluster) if e["healthy"]]
        wait_for(lambda: _idle([e for e in cluster_status(cluster) if e["healthy"]]), 5)
        assert _no_leak([e for e in cluster_status(cluster) if e["healthy"]]) and len(healthy) == 2


def test_dead_decode_worker_before_first_token_is_retried(tmp_path) -> None:  # noqa: ANN001
    with make_cluster(tmp_path, num_prefill=1, num_decode=2,
                      worker_args=("--max-num-batched-tokens", "32")) as cluster:
        results, removed_after = _kill_during_load(cluster, "decode-0", 16, 0.5)
        assert removed_after < 5.0
        failed = [r for r in results if not _succeeded(r)]
        # Only requests already streaming from decode-0 may fail; every request still
        # waiting for its first token was retried on decode-1 and succeeded.
        assert all(tokens for tokens, _, _ in failed), failed
        assert len(failed) < len(results)
        later = asyncio.run(_many(cluster.grpc_address, 4, seed=6))
        assert all(_succeeded(r) for r in later)
