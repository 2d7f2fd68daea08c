"""The Router and Registry gRPC services."""
from __future__ import annotations

from threading import main_thread
from typing import AsyncIterator

import grpc
import pytest

from proto import epd_pb2, epd_pb2_grpc
from tests.router.conftest import Cluster, MakeCluster, encode_threads, wait_until
from tests.router.fakes import SCRIPT_TEXT, DecodeBehaviour, FakeDecodeWorker


@pytest.fixture
async def cluster(make_cluster: MakeCluster) -> Cluster:
    return await make_cluster(max_model_len=128)


@pytest.fixture
async def stub(cluster: Cluster) -> AsyncIterator[epd_pb2_grpc.RouterStub]:
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        yield epd_pb2_grpc.RouterStub(channel)


def sampling(**fields: object) -> epd_pb2.SamplingParams:
    return epd_pb2.SamplingParams(**{"max_tokens": 8, "skip_special_tokens": True, **fields})


async def collect(stub: epd_pb2_grpc.RouterStub, request: epd_pb2.GenerateRequest) -> list[epd_pb2.GenerateResponse]:
    return [r async for r in stub.Generate(request)]


async def test_generate_streams_text_and_usage(cluster: Cluster, stub: epd_pb2_grpc.RouterStub,
                                               script: list[int]) -> None:
    responses = await collect(stub, epd_pb2.GenerateRequest(request_id="g1", text="Hello", sampling=sampling()))
    assert all(r.request_id == "g1" for r in responses)
    chunks = [r.chunk for r in responses if r.WhichOneof("event") == "chunk"]
    assert [t for c in chunks for t in c.token_ids] == script[:8]
    assert "".join(c.text for c in chunks) == cluster.tokenizer.decode(script[:8])
    finished = responses[-1].finished
    assert finished.reason == epd_pb2.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == 8
    assert finished.usage.prompt_tokens == len(cluster.tokenizer.encode("Hello"))
    assert cluster.decodes[0].requests[0].request_id == "g1"


async def test_generate_token_ids_and_stop_string(stub: epd_pb2_grpc.RouterStub) -> None:
    request = epd_pb2.GenerateRequest(token_ids=epd_pb2.TokenIds(ids=[3, 4, 5]),
                                      sampling=sampling(max_tokens=40, stop=["quick"]))
    responses = await collect(stub, request)
    text = "".join(r.chunk.text for r in responses if r.WhichOneof("event") == "chunk")
    assert text == SCRIPT_TEXT[:SCRIPT_TEXT.index("quick")]
    assert responses[-1].finished.reason == epd_pb2.FINISH_REASON_STOP
    assert responses[-1].finished.stop_string == "quick"
    assert responses[0].request_id  # the router named the request


INVALID = [
    (epd_pb2.GenerateRequest(sampling=sampling()), "no prompt"),
    (epd_pb2.GenerateRequest(text="", sampling=sampling()), "empty"),
    (epd_pb2.GenerateRequest(token_ids=epd_pb2.TokenIds(ids=list(range(1, 200))), sampling=sampling()),
     "maximum context length"),
    (epd_pb2.GenerateRequest(text="x", sampling=sampling(max_tokens=500)), "you requested"),
    (epd_pb2.GenerateRequest(text="x", sampling=sampling(top_p=1.5)), "top_p"),
    (epd_pb2.GenerateRequest(text="x", sampling=sampling(temperature=-0.5)), "temperature"),
    (epd_pb2.GenerateRequest(text="x", sampling=sampling(logprobs=99)), "logprobs"),
    (epd_pb2.GenerateRequest(token_ids=epd_pb2.TokenIds(ids=[100000]), sampling=sampling()), "vocabulary"),
]


@pytest.mark.parametrize(("request_message", "fragment"), INVALID)
async def test_invalid_argument(stub: epd_pb2_grpc.RouterStub, request_message: epd_pb2.GenerateRequest,
                                fragment: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, request_message)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


async def test_unknown_model_not_found(stub: epd_pb2_grpc.RouterStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, epd_pb2.GenerateRequest(model="nope", text="x", sampling=sampling()))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_no_decode_unavailable(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=0, expect_decode=0)
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(epd_pb2_grpc.RouterStub(channel), epd_pb2.GenerateRequest(text="x", sampling=sampling()))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_models_cluster(cluster: Cluster, stub: epd_pb2_grpc.RouterStub) -> None:
    health = await stub.Health(epd_pb2.HealthRequest())
    assert health.ready and health.healthy_decode == 1 and health.healthy_prefill == 0
    models = await stub.ListModels(epd_pb2.ListModelsRequest())
    assert [(m.id, m.max_model_len) for m in models.models] == [(cluster.model, 128)]
    status = await stub.ClusterStatus(epd_pb2.ClusterStatusRequest())
    assert [(w.role, w.id, w.healthy, w.kv_pages_total) for w in status.workers] == [("decode", "d0", True, 1000)]


async def test_abort_by_request_id(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(behaviour=DecodeBehaviour(token_delay=0.05))
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        stub = epd_pb2_grpc.RouterStub(channel)
        call = stub.Generate(epd_pb2.GenerateRequest(request_id="long", text="x", sampling=sampling(max_tokens=200)))
        first = await call.read()
        assert first.WhichOneof("event") == "chunk"
        assert (await stub.Abort(epd_pb2.AbortRequest(request_id="long"))).found
        rest = []
        while (message := await call.read()) is not grpc.aio.EOF:
            rest.append(message)
        assert not (await stub.Abort(epd_pb2.AbortRequest(request_id="missing"))).found
    assert rest[-1].finished.reason == epd_pb2.FINISH_REASON_ABORT
    decode = cluster.decodes[0]
    await wait_until(lambda: "long" in decode.cancelled and "long" in decode.aborts, timeout=1.0)


async def test_registry_register_and_heartbeat(make_cluster: MakeCluster, script: list[int]) -> None:
    cluster = await make_cluster(decode=0, expect_decode=0)
    worker = FakeDecodeWorker("late", DecodeBehaviour(script=script))
    address = await worker.start(0)
    try:
        async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
            registry = epd_pb2_grpc.RegistryStub(channel)
            assert not (await registry.Heartbeat(epd_pb2.HeartbeatRequest(id="late"))).known
            bad = await registry.Register(epd_pb2.RegisterRequest(role="encoder", id="x", address="a:1"))
            assert not bad.accepted and "role" in bad.message
            ok = await registry.Register(epd_pb2.RegisterRequest(role="decode", id="late", address=address))
            assert ok.accepted
            assert (await registry.Heartbeat(epd_pb2.HeartbeatRequest(id="late"))).known
            await wait_until(lambda: len(cluster.app.registry.healthy("decode")) == 1)
            responses = await collect(epd_pb2_grpc.RouterStub(channel),
                                      epd_pb2.GenerateRequest(text="x", sampling=sampling(max_tokens=3)))
        assert responses[-1].finished.usage.completion_tokens == 3
        assert len(worker.requests) == 1
    finally:
        await worker.stop()


async def test_long_text_prompt_is_tokenized_off_the_event_loop(cluster: Cluster, stub: epd_pb2_grpc.RouterStub,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    threads = encode_threads(cluster, monkeypatch)
    encode = cluster.tokenizer.encode
    text = "Hello there, a prompt longer than sixteen characters."
    responses = await collect(stub, epd_pb2.GenerateRequest(request_id="long", text=text, sampling=sampling()))
    assert responses[-1].finished.usage.prompt_tokens == len(encode(text))
    assert list(cluster.decodes[0].requests[-1].prompt_token_ids) == encode(text)
    assert threads and all(t is not main_thread() for t in threads)
