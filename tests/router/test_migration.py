"""Migration after the first token, circuit breakers and backpressure, through the
in-process router in front of scripted decode workers (the fakes continue a migrated
request from its `resume_token_ids`, as the real decode worker does:
tests/decode_worker/test_migration.py; real processes: tests/chaos)."""
from __future__ import annotations

import json

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from proto import epd_pb2, epd_pb2_grpc
from tests.router.conftest import Cluster, MakeCluster, wait_until
from tests.router.fakes import DecodeBehaviour
from tests.router.test_http_api import script_text
from tests.router.test_http_errors import error_of, post


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


async def _metrics(cluster: Cluster) -> str:
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        return (await http.get("/metrics")).text


async def _cluster_entry(cluster: Cluster, worker_id: str) -> dict:
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        return next(e for e in (await http.get("/cluster")).json() if e["id"] == worker_id)


async def test_a_stream_broken_mid_way_continues_on_another_decode(make_cluster: MakeCluster,
                                                                   script: list[int]) -> None:
    cluster = await make_cluster(decode=2)
    broken, good = cluster.decodes
    broken.behaviour.fail_after = 3
    good.fields.running = 5  # the load policy picks the one that breaks first
    await cluster.app.monitor.poll(cluster.app.registry.get("d1"))
    response = await post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 10})
    body = response.json()
    assert response.status_code == 200, body
    assert body["choices"][0]["text"] == script_text(cluster, script, 10)  # nothing lost or repeated
    assert body["usage"]["completion_tokens"] == 10 and body["choices"][0]["finish_reason"] == "length"
    resumed = good.requests[-1]
    assert list(resumed.resume_token_ids) == script[:3]
    assert resumed.request_id == broken.requests[-1].request_id
    assert resumed.sampling.max_tokens == 10  # the whole budget: decode counts the resumed tokens
    assert _metric(await _metrics(cluster), "epd_router_migrations_total") == 1.0
    # Streaming, over SSE: the chunks add up to the uninterrupted text, once each.
    await wait_until(lambda: cluster.app.registry.get("d0").state.healthy)
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        sse = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 10, "stream": True})
    events = [json.loads(e[6:]) for e in sse.text.split("\n\n") if e.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == script_text(cluster, script, 10)


async def test_the_only_decode_worker_takes_its_request_back(make_cluster: MakeCluster, script: list[int]) -> None:
    """A worker whose streams keep breaking (restarts, say) resumes them itself once it
    is routable again; every call continues where the last one stopped."""
    cluster = await make_cluster(decode=1, behaviour=DecodeBehaviour(fail_after=4), breaker_failures=10)
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        request = epd_pb2.GenerateRequest(text="x", sampling=epd_pb2.SamplingParams(max_tokens=10))
        responses = [r async for r in epd_pb2_grpc.RouterStub(channel).Generate(request, timeout=20)]
    tokens = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    assert tokens == script[:10]
    assert responses[-1].finished.reason == epd_pb2.FINISH_REASON_LENGTH
    assert responses[-1].finished.usage.completion_tokens == 10
    calls = cluster.decodes[0].requests
    assert [len(c.resume_token_ids) for c in calls] == [0, 4, 8]


async def test_breaker_keeps_a_failing_decode_out_then_probes_it(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=2, breaker_failures=3, breaker_cooldown=30.0)
    failing, good = cluster.decodes
    failing.behaviour.fail_before_first = grpc.StatusCode.UNAVAILABLE
    good.fields.running = 5  # ranked second: every request tries the failing worker first
    for _ in range(3):
        await cluster.app.monitor.poll(cluster.app.registry.get("d1"))
        await wait_until(lambda: cluster.app.registry.get("d0").state.healthy)  # its Status answers
        assert (await post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 2})).status_code == 200
    await wait_until(lambda: cluster.app.registry.get("d0").state.healthy)
    entry = await _cluster_entry(cluster, "d0")
    assert entry["breaker"] == "open" and entry["breaker_failures"] == 3 and entry["healthy"]
    metrics = await _metrics(cluster)
    assert _metric(metrics, "epd_router_worker_breaker_state", worker="d0") == 2.0
    assert _metric(metrics, "epd_router_worker_breaker_opened_total", worker="d0") == 1.0
    for _ in range(4):  # open: nothing goes to d0, although it is healthy and idle
        assert (await post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 2})).status_code == 200
    assert len(failing.requests) == 3
    failing.behaviour.fail_before_first = None  # fixed; after the cool-down one probe goes there
    cluster.app.registry.get("d0").state.breaker.cooldown = 0.3  # (not to wait the configured 30 s)
    await wait_until(lambda: cluster.app.registry.get("d0").state.breaker.state == "half_open", timeout=3.0)
    assert (await post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 2})).status_code == 200
    assert len(failing.requests) == 4
    assert (await _cluster_entry(cluster, "d0"))["breaker"] == "closed"


async def test_decode_reports_open_a_prefill_breaker(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(prefill=2, breaker_failures=2, breaker_cooldown=60.0,
                                 behaviour=DecodeBehaviour(prefill_failure="TIMEOUT"))
    decode = cluster.decodes[0]
    for _ in range(6):
        assert (await post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 2})).status_code == 200
    # Decode reported every attempt on p0 as failed, on p1 as fine: after p0's second
    # failure its breaker opened, and later requests no longer name it.
    named = [[c.id for c in r.prefill] for r in decode.requests]
    opened_after = [i for i, ids in enumerate(named) if ids and ids[0] == "p0"][1]
    assert all(ids == ["p1"] for ids in named[opened_after + 1:]), named
    assert (await _cluster_entry(cluster, "p0"))["breaker"] == "open"
    assert (await _cluster_entry(cluster, "p1"))["breaker"] == "closed"
    ok = "p1"
    # Refusals for load are not the worker's fault.
    decode.behaviour.prefill_failure = "RESOURCE_EXHAUSTED"
    state = cluster.app.registry.get(ok).state
    assert (await post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 2})).status_code == 200
    assert state.breaker.failures == 0


async def test_every_decode_full_is_429_with_retry_after(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=2, retry_after=2.5,
                                 behaviour=DecodeBehaviour(fail_before_first=grpc.StatusCode.RESOURCE_EXHAUSTED))
    response = await post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    error = error_of(response, 429)
    assert response.headers["retry-after"] == "3" and "full" in error["message"]
    assert sum(len(d.requests) for d in cluster.decodes) == 2  # tried both
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        request = epd_pb2.GenerateRequest(text="x", sampling=epd_pb2.SamplingParams(max_tokens=2))
        try:
            [r async for r in epd_pb2_grpc.RouterStub(channel).Generate(request, timeout=10)]
            raise AssertionError("a full cluster answered")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(exc.trailing_metadata() or ())["retry-after"] == "2.5"
    # Full is not broken: no breaker counted it, both stay in rotation.
    assert all(cluster.app.registry.get(d).state.breaker.failures == 0 for d in ("d0", "d1"))
    assert {w.id for w in cluster.app.registry.routable("decode")} == {"d0", "d1"}


async def test_router_queue_full_is_429_with_retry_after(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(behaviour=DecodeBehaviour(token_delay=0.05), max_concurrent_requests=1,
                                 max_queued_requests=0)
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        async with http.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 40,
                                                                 "stream": True}) as running:
            lines = running.aiter_lines()
            await lines.__anext__()
            refused = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            body = "".join([line async for line in lines])
    assert body.endswith("data: [DONE]")  # the accepted one was not disturbed
