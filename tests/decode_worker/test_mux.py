"""DecodeWorker.Stream on a real decode worker (tiny model, gRPC server in this process):
many requests over one stream give token for token what Generate calls give, a step's
tokens of several requests leave in one batch, a bad request fails alone, a cancel or
the stream's end aborts the request in the engine, and the router's end of the stream
(router/decode_mux.py) reads like Generate calls."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from decode_worker.server import serve_decode
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto.convert import params_to_proto
from engine import SamplingParams
from router.decode_mux import DecodeMux
from worker.config import WorkerConfig

pytestmark = pytest.mark.timeout(120)
ENGINE = {"page_size": 8, "num_pages": 256}
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _request(rid: str, prompt: list[int], params: SamplingParams = PARAMS) -> pb.DecodeRequest:
    return pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=params_to_proto(params))


def _prompts(n: int) -> list[list[int]]:
    return [[3 + (7 * i + j) % 400 for j in range(10 + 3 * i)] for i in range(n)]


@pytest.fixture
async def decode(tiny_model_path):  # noqa: ANN001, ANN201
    worker = await serve_decode(WorkerConfig(role="decode", model=str(tiny_model_path), transfer="none",
                                             engine_options=ENGINE))
    yield worker
    await worker.stop()


async def _generate(stub: pb_grpc.DecodeWorkerStub, request: pb.DecodeRequest) -> tuple[list[int], pb.Finished]:
    tokens: list[int] = []
    finished = None
    async for message in stub.Generate(request, timeout=60):
        if message.HasField("chunk"):
            tokens += message.chunk.token_ids
        else:
            finished = message.finished
    assert finished is not None
    return tokens, finished


async def _until_idle(worker, timeout: float = 10.0) -> None:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while worker.engine.has_unfinished_requests() or worker.engine.requests:
        assert loop.time() < deadline, f"requests still live in the engine: {list(worker.engine.requests)}"
        await asyncio.sleep(0.02)


async def test_many_requests_on_one_stream_match_generate_and_share_batches(decode) -> None:  # noqa: ANN001
    prompts = _prompts(6)
    async with grpc.aio.insecure_channel(decode.address) as channel:
        stub = pb_grpc.DecodeWorkerStub(channel)
        reference = [await _generate(stub, _request(f"g{i}", p)) for i, p in enumerate(prompts)]

        call = stub.Stream(timeout=60)
        for i, p in enumerate(prompts):
            await call.write(pb.DecodeStreamRequest(start=_request(f"m{i}", p)))
        tokens: dict[str, list[int]] = {f"m{i}": [] for i in range(len(prompts))}
        finished: dict[str, pb.Finished] = {}
        sizes = []
        while len(finished) < len(prompts):
            batch = await call.read()
            assert batch is not grpc.aio.EOF
            sizes.append(len(batch.events))
            for event in batch.events:
                assert event.request_id not in finished, "an event after the request's finish"
                assert not event.error_code, event.error
                if event.response.HasField("chunk"):
                    tokens[event.request_id] += event.response.chunk.token_ids
                else:
                    finished[event.request_id] = event.response.finished
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF  # half-closed and nothing live: the stream ends
        assert await call.code() == grpc.StatusCode.OK
    for i, (want_tokens, want_finish) in enumerate(reference):
        assert tokens[f"m{i}"] == want_tokens
        got = finished[f"m{i}"]
        assert (got.reason, got.usage.completion_tokens, got.usage.prompt_tokens) == \
            (want_finish.reason, want_finish.usage.completion_tokens, want_finish.usage.prompt_tokens)
    # Six requests decoding together: their tokens of one step leave as one batch.
    assert max(sizes) > 1 and len(sizes) < sum(sizes), sizes


async def test_logprobs_and_finishes_match_generate_byte_for_byte_over_the_stream(decode) -> None:  # noqa: ANN001
    """The stream fills its events in place: the messages, logprobs and finishes
    included, are those Generate sends, byte for byte."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    prompts = _prompts(3)
    async with grpc.aio.insecure_channel(decode.address) as channel:
        stub = pb_grpc.DecodeWorkerStub(channel)
        want = [[m.SerializeToString() for m in [x async for x in stub.Generate(_request(f"g{i}", p, params),
                                                                                timeout=60)]]
                for i, p in enumerate(prompts)]
        await stub.FlushCache(pb.FlushCacheRequest(), timeout=30)  # the same prompts again, no cache hits
        call = stub.Stream(timeout=60)
        got: dict[str, list[bytes]] = {f"m{i}": [] for i in range(len(prompts))}
        for i, p in enumerate(prompts):  # one at a time, as the Generate calls ran (batching moves logprobs)
            await call.write(pb.DecodeStreamRequest(start=_request(f"m{i}", p, params)))
            while len(got[f"m{i}"]) < params.max_tokens + 1:
                batch = await call.read()
                assert batch is not grpc.aio.EOF
                for event in batch.events:
                    assert not event.error_code, event.error
                    got[event.request_id].append(event.response.SerializeToString())
        call.cancel()
    assert [got[f"m{i}"] for i in range(len(prompts))] == want
    assert all(len(messages) == params.max_tokens + 1 for messages in want)  # a token each step, then the finish


async def test_a_bad_request_fails_alone_and_a_duplicate_id_is_refused(decode) -> None:  # noqa: ANN001
    async with grpc.aio.insecure_channel(decode.address) as channel:
        stub = pb_grpc.DecodeWorkerStub(channel)
        want, _ = await _generate(stub, _request("ref", [5, 6, 7, 8]))
        call = stub.Stream(timeout=60)
        bad = SamplingParams(temperature=0, max_tokens=4)
        bad_proto = params_to_proto(bad)
        bad_proto.temperature = -1.0
        await call.write(pb.DecodeStreamRequest(start=_request("ok", [5, 6, 7, 8])))
        await call.write(pb.DecodeStreamRequest(start=_request("ok", [9, 9])))  # live id: refused
        await call.write(pb.DecodeStreamRequest(start=pb.DecodeRequest(request_id="bad", prompt_token_ids=[1, 2],
                                                                       sampling=bad_proto)))
        await call.write(pb.DecodeStreamRequest(start=_request("", [1, 2])))
        errors: dict[str, list[tuple[int, str]]] = {}
        tokens: list[int] = []
        done = False
        while not (done and len(errors) == 3):
            batch = await call.read()
            assert batch is not grpc.aio.EOF
            for event in batch.events:
                if event.error_code:
                    errors.setdefault(event.request_id, []).append((event.error_code, event.error))
                elif event.request_id == "ok":
                    if event.response.HasField("chunk"):
                        tokens += event.response.chunk.token_ids
                    else:
                        done = True
        call.cancel()
    assert tokens == want  # the live request was not disturbed
    assert errors["ok"] == [(INVALID, "request ok is already live on this stream")]
    assert errors["bad"][0][0] == INVALID and "temperature" in errors["bad"][0][1]
    assert errors[""] == [(INVALID, "request_id is required")]


async def test_a_generate_call_cannot_take_over_a_live_id_and_finished_requests_need_no_abort(
        decode, monkeypatch) -> None:  # noqa: ANN001
    """A Generate with the id of a request live on a stream is refused and the live one
    runs on undisturbed; requests that ran to their end cost no abort on the engine."""
    aborts: list[str] = []
    abort = decode.engine.abort_request
    monkeypatch.setattr(decode.engine, "abort_request", lambda rid: aborts.append(rid) or abort(rid))
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    async with grpc.aio.insecure_channel(decode.address) as channel:
        stub = pb_grpc.DecodeWorkerStub(channel)
        want, _ = await _generate(stub, _request("ref", [5, 6, 7, 8], long))
        call = stub.Stream(timeout=60)
        await call.write(pb.DecodeStreamRequest(start=_request("live", [5, 6, 7, 8], long)))
        tokens: list[int] = []
        batch = await call.read()
        tokens += [t for e in batch.events for t in e.response.chunk.token_ids]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _generate(stub, _request("live", [9, 9, 9]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "already in use" in info.value.details()
        done = False
        while not done:
            batch = await call.read()
            for event in batch.events:
                assert not event.error_code, event.error
                tokens += event.response.chunk.token_ids
                done = done or event.response.HasField("finished")
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
    assert tokens == want
    assert aborts == []  # "ref" and "live" finished; the refused call never reached the engine
    await _until_idle(decode)


async def test_a_full_worker_refuses_a_start_with_resource_exhausted(tiny_model_path) -> None:  # noqa: ANN001
    """The admission limit's refusal (which Generate sends with trailers) reaches the
    router's end as RESOURCE_EXHAUSTED, the code it takes for a busy worker, and the
    admitted request runs on."""
    worker = await serve_decode(WorkerConfig(role="decode", model=str(tiny_model_path), transfer="none",
                                             max_queued_requests=0, engine_options={**ENGINE, "max_num_seqs": 1}))
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            mux = DecodeMux(pb_grpc.DecodeWorkerStub(channel), "d0")
            first = mux.generate(_request("first", [4, 5, 6], long), 60.0)
            assert (await first.read()).chunk.token_ids  # admitted and running
            second = mux.generate(_request("second", [7, 8, 9]), 60.0)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await second.read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            assert "full" in info.value.details()
            tokens = 0
            while (message := await first.read()) is not grpc.aio.EOF:
                tokens += len(message.chunk.token_ids)
            assert tokens == long.max_tokens - 1  # the rest of the first request's tokens
            mux.close()
    finally:
        await worker.stop()


async def test_cancel_and_the_stream_ending_abort_in_the_engine(decode) -> None:  # noqa: ANN001
    long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
    async with grpc.aio.insecure_channel(decode.address) as channel:
        stub = pb_grpc.DecodeWorkerStub(channel)
        call = stub.Stream(timeout=60)
        await call.write(pb.DecodeStreamRequest(start=_request("a", [5, 6, 7], long)))
        await call.write(pb.DecodeStreamRequest(start=_request("b", [8, 9, 10], long)))
        seen: set[str] = set()
        while seen != {"a", "b"}:
            batch = await call.read()
            seen |= {e.request_id for e in batch.events}
        await call.write(pb.DecodeStreamRequest(cancel="a"))
        await call.write(pb.DecodeStreamRequest(cancel="nobody"))  # not live: ignored
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while "a" in decode.engine.requests:
            assert loop.time() < deadline
            await asyncio.sleep(0.02)
        assert "b" in decode.engine.requests  # still running, still streaming
        batch = await call.read()
        assert {e.request_id for e in batch.events} <= {"a", "b"}
        call.cancel()  # the router went away: what ran on the stream is aborted
        await _until_idle(decode)


async def test_router_end_reads_like_generate_and_cancels(decode) -> None:  # noqa: ANN001
    prompts = _prompts(4)
    async with grpc.aio.insecure_channel(decode.address) as channel:
        stub = pb_grpc.DecodeWorkerStub(channel)
        reference = [(await _generate(stub, _request(f"g{i}", p)))[0] for i, p in enumerate(prompts)]
        mux = DecodeMux(stub, "d0")

        async def run(i: int, prompt: list[int]) -> list[int]:
            call = mux.generate(_request(f"x{i}", prompt), 60.0)
            tokens: list[int] = []
            while (message := await call.read()) is not grpc.aio.EOF:
                tokens += message.chunk.token_ids
            assert await call.read() is grpc.aio.EOF
            return tokens

        assert await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts))) == reference
        assert mux.supported

        # A per-request error reads as the status Generate would end with.
        bad = params_to_proto(PARAMS)
        bad.top_p = 5.0
        call = mux.generate(pb.DecodeRequest(request_id="bad", prompt_token_ids=[1, 2], sampling=bad), 60.0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in info.value.details()

        # cancel(): the pending read raises CANCELLED and the worker aborts the request.
        call = mux.generate(_request("long", [4, 5, 6], SamplingParams(temperature=0, max_tokens=2000,
                                                                       ignore_eos=True)), 60.0)
        assert (await call.read()).chunk.token_ids
        reader = asyncio.ensure_future(_drain(call))
        await asyncio.sleep(0.05)
        assert call.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await reader
        assert info.value.code() == grpc.StatusCode.CANCELLED
        await _until_idle(decode)

        # The deadline: DEADLINE_EXCEEDED, and the worker stops the request too.
        call = mux.generate(_request("slow", [4, 5, 6], SamplingParams(temperature=0, max_tokens=5000,
                                                                       ignore_eos=True)), 0.3)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _drain(call)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until_idle(decode)
        mux.close()


async def _drain(call) -> None:  # noqa: ANN001
    while await call.read() is not grpc.aio.EOF:
        pass


async def test_router_end_fails_every_request_with_unavailable_when_the_worker_dies(tiny_model_path) -> None:  # noqa: ANN001
    worker = await serve_decode(WorkerConfig(role="decode", model=str(tiny_model_path), transfer="none",
                                             engine_options=ENGINE))
    stopped = False
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            mux = DecodeMux(pb_grpc.DecodeWorkerStub(channel), "d0")
            long = SamplingParams(temperature=0, max_tokens=5000, ignore_eos=True)
            calls = [mux.generate(_request(f"r{i}", [5 + i, 6, 7], long), 60.0) for i in range(3)]
            for call in calls:
                assert (await call.read()).chunk.token_ids
            readers = [asyncio.ensure_future(_drain(call)) for call in calls]
            await worker.server.stop(grace=None)  # the worker's server goes away mid-stream
            stopped = True
            for reader in readers:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await asyncio.wait_for(reader, 10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert mux.live_requests == 0
            mux.close()
    finally:
        if not stopped:
            await worker.server.stop(grace=None)
        await worker.stop()
