"""Helpers for end-to-end tests: a real local cluster (separate processes) and clients."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

from deploy.local import ClusterSpec, LocalCluster
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from worker.config import free_port


def make_cluster(tmp_path: Path, **overrides: Any) -> LocalCluster:
    spec = ClusterSpec(port=free_port(), grpc_port=free_port(), log_dir=str(tmp_path / "logs"), **overrides)
    return LocalCluster(spec)


def cluster_status(cluster: LocalCluster) -> list[dict[str, Any]]:
    response = httpx.get(f"{cluster.http_url}/cluster", timeout=5.0)
    response.raise_for_status()
    body = response.json()
    return body["workers"] if isinstance(body, dict) else body


def by_role(entries: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["role"] == role]


def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.1) -> float:
    """Poll until predicate() is truthy; returns the seconds it took."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


def wait_settled(cluster: LocalCluster, timeout_s: float = 10.0, pages_clean: bool = False) -> list[dict[str, Any]]:
    """The router's first status snapshot that shows the finished work: every worker idle,
    every prefill worker's prefill count in, KV bytes sent equal to bytes received (and,
    with `pages_clean`, every page free or cached). The router refreshes each worker's
    status on its own, every half second, so one read right after the last response can
    be stale; a count that never arrives (or a page leak) times out: a failure."""
    settled: list[list[dict[str, Any]]] = []

    def done() -> bool:
        status = cluster_status(cluster)
        ok = all(e["running"] == 0 and e["waiting"] == 0 for e in status) \
            and all(e["prefill_tokens_total"] > 0 for e in by_role(status, "prefill")) \
            and sum(e["kv_bytes_sent_total"] for e in status) == sum(e["kv_bytes_received_total"] for e in status) \
            and (not pages_clean or all(e["kv_pages_free"] == e["kv_pages_total"] - e["kv_pages_cached"]
                                        for e in status))
        if ok:
            settled.append(status)
        return ok

    wait_for(done, timeout_s)
    return settled[-1]


async def grpc_generate(address: str, prompt: list[int] | str, sampling: pb.SamplingParams,
                        timeout_s: float = 120.0) -> tuple[list[int], str, pb.Finished]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RouterStub(channel)
        request = pb.GenerateRequest(sampling=sampling)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        tokens: list[int] = []
        text = ""
        finished = None
        async for response in stub.Generate(request, timeout=timeout_s):
            if response.HasField("chunk"):
                tokens.extend(response.chunk.token_ids)
                text += response.chunk.text
            else:
                finished = response.finished
        assert finished is not None, "stream ended without a finish"
        return tokens, text, finished


async def flush_worker_caches(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        async with grpc.aio.insecure_channel(entry["address"]) as channel:
            stub = (pb_grpc.PrefillWorkerStub if entry["role"] == "prefill" else pb_grpc.DecodeWorkerStub)(channel)
            await stub.FlushCache(pb.FlushCacheRequest(), timeout=10.0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)
