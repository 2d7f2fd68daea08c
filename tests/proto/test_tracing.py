"""OpenTelemetry tracing: off by default (no spans, no metadata); on, one request to a
router in front of real encode, prefill and decode gRPC servers (all in this process,
spans to an in-memory exporter; the trace context crosses every hop in gRPC metadata)
is one trace, router -> decode -> prefill -> encode."""
from __future__ import annotations

import base64
import random

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.client.workloads import random_png
from decode_worker.server import serve_decode
from encode_worker.server import serve_encode
from engine.model_path import default_vlm_path
from prefill_worker.server import serve_prefill
from proto import tracing
from router.config import RouterConfig
from router.server import RouterApp
from tests.router.conftest import wait_until
from worker.config import WorkerConfig

pytestmark = pytest.mark.timeout(120)
ENGINE = {"page_size": 8, "num_pages": 256}


def test_off_by_default_and_bad_settings_are_refused() -> None:
    assert not tracing.is_on()
    span = tracing.start("anything", [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")], "server")
    assert span is tracing.NO_SPAN and span.metadata() == ()
    span.set(x=1), span.event("e"), span.fail("f"), span.end()  # all no-ops
    assert tracing.provider_from_env("x", {}) is None and tracing.provider_from_env("x", {"EPD_TRACING": "off"}) is None
    with pytest.raises(tracing.TracingError, match="console, otlp or off"):
        tracing.provider_from_env("x", {"EPD_TRACING": "jaeger"})
    provider = tracing.provider_from_env("epd-router", {"EPD_TRACING": "console"})
    assert provider.resource.attributes["service.name"] == "epd-router"
    provider.shutdown()


@pytest.fixture
def spans():  # noqa: ANN201
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracing.enabled(provider):
        yield exporter
    provider.shutdown()
    assert not tracing.is_on()


async def test_one_request_is_one_trace_across_every_pool(spans: InMemorySpanExporter) -> None:
    model = str(default_vlm_path())
    encode = await serve_encode(WorkerConfig(role="encode", model=model))
    prefill = await serve_prefill(WorkerConfig(role="prefill", model=model, engine_options=ENGINE))
    decode = await serve_decode(WorkerConfig(role="decode", model=model, engine_options=ENGINE,
                                             local_prefill_threshold=1))
    app = RouterApp(RouterConfig(host="127.0.0.1", port=0, grpc_port=0, model=model, log_level="warning",
                                 health_interval=0.1, encode=(f"e0={encode.address}",),
                                 prefill=(f"p0={prefill.address}",), decode=(f"d0={decode.address}",)))
    await app.start()
    try:
        await wait_until(app.registry.ready, timeout=20)
        image = "data:image/png;base64," + base64.b64encode(random_png(random.Random(1), 32)).decode()
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}", timeout=60) as http:
            response = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                                     "max_tokens": 4})
        assert response.status_code == 200, response.text
        await wait_until(lambda: any(s.name == "router.generate" for s in spans.get_finished_spans()))
    finally:
        await app.stop(grace=0)
        for worker in (decode, prefill, encode):
            await worker.stop()
    finished = spans.get_finished_spans()
    by_name = {s.name: s for s in finished}
    chain = ["router.generate", "router.decode_attempt", "decode.generate", "decode.remote_prefill",
             "prefill.prefill", "prefill.encode_image", "encode.encode"]
    assert set(chain) <= set(by_name), sorted(by_name)
    assert {s.context.trace_id for s in finished if s.name in chain} == {by_name["router.generate"].context.trace_id}
    assert by_name["router.generate"].parent is None
    for parent, child in zip(chain, chain[1:]):  # each hop is a child of the one before
        assert by_name[child].parent.span_id == by_name[parent].context.span_id, (parent, child)
    root = by_name["router.generate"]
    assert root.attributes["epd.finish_reason"] == "length" and root.attributes["epd.output_tokens"] == 4
    assert [e.name for e in root.events] == ["first_token"]
    assert [e.name for e in by_name["decode.remote_prefill"].events] == ["kv_landed"]
    assert by_name["decode.generate"].attributes["epd.worker"] == decode.worker_id
    for span in finished:  # children start within their parents
        if span.parent is not None and span.name in chain:
            parent = next(p for p in finished if p.context.span_id == span.parent.span_id)
            assert parent.start_time <= span.start_time and span.end_time <= parent.end_time + 1_000_000_000
