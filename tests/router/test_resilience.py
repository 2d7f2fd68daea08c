"""Health checks, retries, failures mid-stream, cancellation and timeouts."""
from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import pytest

from engine.radix_cache import page_hashes
from proto import epd_pb2, epd_pb2_grpc
from tests.router.conftest import Cluster, MakeCluster, wait_until
from tests.router.fakes import DecodeBehaviour
from tests.router.test_http_api import client
from tests.router.test_http_errors import error_of, post

DEFAULT_HEALTH = dict(health_interval=0.5, health_timeout=1.0, unhealthy_after=2.0)


def healthy_ids(cluster: Cluster, role: str = "decode") -> set[str]:
    return {w.id for w in cluster.app.registry.healthy(role)}


async def test_dead_and_hung_workers_leave_rotation_within_5s_and_return(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=3, **DEFAULT_HEALTH)
    dead, hung = cluster.decodes[1], cluster.decodes[2]
    await dead.stop()
    hung.status_delay = 3.0
    start = time.monotonic()
    await wait_until(lambda: healthy_ids(cluster) == {"d0"}, timeout=5.0)
    assert time.monotonic() - start < 5.0
    for _ in range(4):  # every request now lands on the healthy worker
        assert (await post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 2})).status_code == 200
    assert len(cluster.decodes[0].requests) == 4
    hung.status_delay = 0.0
    await dead.start()  # same port
    await wait_until(lambda: healthy_ids(cluster) == {"d0", "d1", "d2"}, timeout=5.0)


async def test_retry_before_first_token_on_another_decode(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=2)
    failing, good = cluster.decodes
    failing.behaviour.fail_before_first = grpc.StatusCode.UNAVAILABLE
    good.fields.running = 5  # the load policy tries the failing (idle-looking) worker first
    await cluster.app.monitor.poll(cluster.app.registry.get("d1"))
    response = await client(cluster).completions.create(model=cluster.model, prompt="x", max_tokens=4)
    assert response.usage.completion_tokens == 4
    assert len(failing.requests) == 1 and len(good.requests) == 1
    assert failing.requests[0].request_id == good.requests[0].request_id
    metrics = (await httpx.AsyncClient(base_url=cluster.base_url).get("/metrics")).text
    assert f'epd_router_decode_retries_total{{model="{cluster.model}"}} 1.0' in metrics
    failing.behaviour.fail_before_first = None
    await wait_until(lambda: healthy_ids(cluster) == {"d0", "d1"})  # back once Status succeeds


async def test_retry_when_a_decode_died_unnoticed(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=2, unhealthy_after=60.0)
    await cluster.decodes[0].stop()
    for _ in range(2):  # whichever it picks first, the request lands on the live worker
        assert (await post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 2})).status_code == 200
    assert len(cluster.decodes[1].requests) == 2
    assert cluster.app.metrics.retries._value.get() >= 1
    assert "d0" not in healthy_ids(cluster)  # the failed call took it out of rotation


async def test_every_decode_failing_is_503(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=2, behaviour=DecodeBehaviour(fail_before_first=grpc.StatusCode.UNAVAILABLE))
    error = error_of(await post(cluster, "/v1/completions", {"prompt": "x"}), 503)
    assert "d0" in error["message"] and "d1" in error["message"]


async def test_worker_error_before_first_token_is_502(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(behaviour=DecodeBehaviour(fail_before_first=grpc.StatusCode.INTERNAL))
    error = error_of(await post(cluster, "/v1/completions", {"prompt": "x"}), 502)
    assert "INTERNAL" in error["message"]
    cluster.decodes[0].behaviour = DecodeBehaviour(script=[5], token_limit=0, finish_error="prefill failed everywhere")
    error = error_of(await post(cluster, "/v1/completions", {"prompt": "x"}), 502)
    assert "prefill failed everywhere" in error["message"]


async def test_failure_after_first_token_ends_with_error_without_migrations(make_cluster: MakeCluster) -> None:
    """With --max-migrations 0 (migration: test_migration.py)."""
    cluster = await make_cluster(decode=2, behaviour=DecodeBehaviour(fail_after=3), max_migrations=0)
    error = error_of(await post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 10}), 502)
    assert "UNAVAILABLE" in error["message"]
    assert sum(len(d.requests) for d in cluster.decodes) == 1  # no migration
    body = {"prompt": "x", "max_tokens": 10, "stream": True}
    await wait_until(lambda: healthy_ids(cluster) == {"d0", "d1"})  # a broken stream took its worker out
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        response = await http.post("/v1/completions", json=body)
    events = [e[len("data: "):] for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert "error" in json.loads(events[-2])
    await wait_until(lambda: healthy_ids(cluster) == {"d0", "d1"})
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        request = epd_pb2.GenerateRequest(text="x", sampling=epd_pb2.SamplingParams(max_tokens=10))
        responses = [r async for r in epd_pb2_grpc.RouterStub(channel).Generate(request)]
    assert sum(len(r.chunk.token_ids) for r in responses) == 3
    assert responses[-1].finished.reason == epd_pb2.FINISH_REASON_ERROR
    assert "UNAVAILABLE" in responses[-1].finished.error


async def test_first_token_timeout_is_504(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(behaviour=DecodeBehaviour(first_token_delay=5.0), first_token_timeout=0.3)
    error_of(await post(cluster, "/v1/completions", {"prompt": "x"}), 504)
    await wait_until(lambda: len(cluster.decodes[0].cancelled) == 1, timeout=1.0)


SLOW = DecodeBehaviour(token_delay=0.05)


async def test_client_disconnect_mid_stream_cancels_decode(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(behaviour=SLOW)
    body = {"prompt": "x", "max_tokens": 500, "stream": True}
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.aiter_lines()
            while not (await lines.__anext__()).startswith("data: "):
                pass
            gone = time.monotonic()
    decode = cluster.decodes[0]
    await wait_until(lambda: len(decode.cancelled) == 1, timeout=1.0)
    assert next(iter(decode.cancelled.values())) - gone < 1.0
    assert not decode.completed
    await wait_until(lambda: cluster.app.service.admission.running == 0, timeout=1.0)


async def test_client_disconnect_non_streaming_cancels_decode(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(behaviour=SLOW)
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        task = asyncio.create_task(http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}))
        await wait_until(lambda: len(cluster.decodes[0].requests) == 1)
        await asyncio.sleep(0.2)
        task.cancel()
        gone = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
    decode = cluster.decodes[0]
    await wait_until(lambda: len(decode.cancelled) == 1, timeout=1.0)
    assert next(iter(decode.cancelled.values())) - gone < 1.0


async def test_grpc_client_cancel_cancels_decode(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(behaviour=SLOW)
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        call = epd_pb2_grpc.RouterStub(channel).Generate(
            epd_pb2.GenerateRequest(text="x", sampling=epd_pb2.SamplingParams(max_tokens=500)))
        await call.read()
        call.cancel()
        gone = time.monotonic()
    decode = cluster.decodes[0]
    await wait_until(lambda: len(decode.cancelled) == 1, timeout=1.0)
    assert next(iter(decode.cancelled.values())) - gone < 1.0


async def test_router_stop_string_cancels_decode(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(behaviour=SLOW)
    response = await post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 500, "stop": "brown"})
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    await wait_until(lambda: len(cluster.decodes[0].cancelled) == 1, timeout=1.0)


async def test_prefix_events_steer_prefill_choice(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(prefill=3)
    prompt = list(range(10, 10 + 64))  # four pages of 16
    cluster.prefills[2].store(page_hashes(prompt, 16))
    await wait_until(lambda: cluster.app.registry.get("p2").state.prefix.num_pages == 4)
    await post(cluster, "/v1/completions", {"prompt": prompt + [1, 2, 3], "max_tokens": 2})
    assert cluster.decodes[0].requests[-1].prefill[0].id == "p2"
    cluster.prefills[2].evict(page_hashes(prompt, 16))
    await wait_until(lambda: cluster.app.registry.get("p2").state.prefix.num_pages == 0)
    # A restarted worker's event log starts over: the router resyncs from a snapshot.
    prefill = cluster.prefills[1]
    await prefill.stop()
    await wait_until(lambda: "p1" not in healthy_ids(cluster, "prefill"))
    prefill.events = [("stored", h) for h in page_hashes(prompt, 16)[:2]]
    await prefill.start()
    await wait_until(lambda: cluster.app.registry.get("p1").state.prefix.num_pages == 2)


async def test_client_disconnect_before_first_token_cancels_decode(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(behaviour=DecodeBehaviour(first_token_delay=5.0))
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        task = asyncio.create_task(http.post("/v1/completions", json={"prompt": "x", "stream": True}))
        await wait_until(lambda: len(cluster.decodes[0].requests) == 1)
        task.cancel()
        gone = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
    decode = cluster.decodes[0]
    await wait_until(lambda: len(decode.cancelled) == 1, timeout=1.0)
    assert next(iter(decode.cancelled.values())) - gone < 1.0
    await wait_until(lambda: cluster.app.service.admission.running == 0, timeout=1.0)
