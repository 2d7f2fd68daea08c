"""Client disconnects, through a real cluster. Dead workers (prefill or decode killed
mid-transfer, on every transfer backend) are in test_transfer_failover.py."""
from __future__ import annotations

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


_STUBS: dict[str, object] = {}


def _direct_status(cluster, name: str) -> pb.WorkerStatus:  # noqa: ANN001
    """The worker's own Status, over one channel per worker kept for the test's length (a
    fresh channel and event loop per poll cost more, under a loaded CI machine, than
    the abort latencies measured here)."""
    address = cluster.worker_addresses[name]
    if address not in _STUBS:
        stub_type = pb_grpc.PrefillWorkerStub if name.startswith("prefill") else pb_grpc.DecodeWorkerStub
        _STUBS[address] = stub_type(grpc.insecure_channel(address))
    return _STUBS[address].Status(pb.StatusRequest(), timeout=5)


def _wait_idle(cluster, timeout: float = 5.0) -> list[str]:  # noqa: ANN001
    """Poll both workers until neither runs nor queues anything; returns what the first
    and last polls saw (for the failure message)."""
    seen: list[str] = []

    def idle() -> bool:
        statuses = {name: _direct_status(cluster, name) for name in ("prefill-0", "decode-0")}
        seen.append(" ".join(f"{name}:{s.running}r/{s.waiting}w" for name, s in statuses.items()))
        return all(s.running == 0 and s.waiting == 0 for s in statuses.values())

    try:
        wait_for(idle, timeout, 0.02)
    except TimeoutError:
        raise AssertionError(f"workers not idle after {timeout} s: {seen[-3:]}") from None
    return seen[:2] + seen[-2:] if len(seen) > 4 else seen


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
        trace = _wait_idle(cluster)
        elapsed = time.monotonic() - closed
        print(f"workers idle {elapsed:.3f} s after the disconnect")
        assert elapsed < 1.0, f"workers idle only {elapsed:.2f} s after the client disconnected ({trace})"
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
        trace = _wait_idle(cluster)
        elapsed = time.monotonic() - closed
        print(f"workers idle {elapsed:.3f} s after the disconnect")
        assert elapsed < 1.0, f"workers idle only {elapsed:.2f} s after the client disconnected ({trace})"
        for name in ("prefill-0", "decode-0"):
            status = _direct_status(cluster, name)
            assert status.kv_pages_free == status.kv_pages_total - status.kv_pages_cached
