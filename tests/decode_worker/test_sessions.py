"""Sessions and pins on real decode and prefill gRPC servers (in this process), KV over
the tcp backend: a short follow-up is prefilled on decode from the session's KV, a long
one moves only its new pages, outputs equal the offline engine's, and the session and pin
calls answer bad input with INVALID_ARGUMENT (over the pin cap: RESOURCE_EXHAUSTED)."""
from __future__ import annotations

import random
from typing import Any

import grpc
import pytest

from decode_worker.server import serve_decode
from engine import LLM, SamplingParams
from prefill_worker.server import serve_prefill
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto.convert import params_to_proto
from worker.config import WorkerConfig

pytestmark = pytest.mark.timeout(120)
ENGINE = {"page_size": 8, "num_pages": 128, "max_pinned_fraction": 0.125}  # 16 pinned pages at most
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture
async def workers(tiny_model_path):  # noqa: ANN001, ANN201
    prefill = await serve_prefill(WorkerConfig(role="prefill", model=str(tiny_model_path), engine_options=ENGINE))
    decode = await serve_decode(WorkerConfig(role="decode", model=str(tiny_model_path), engine_options=ENGINE,
                                             local_prefill_threshold=32))
    yield prefill, decode
    await decode.stop()
    await prefill.stop()


async def _call(address: str, method: str, message: Any, role: str = "decode") -> Any:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = (pb_grpc.DecodeWorkerStub if role == "decode" else pb_grpc.PrefillWorkerStub)(channel)
        return await getattr(stub, method)(message, timeout=30)


async def _turn(decode: str, prefill: str, prompt: list[int], session: str, pin: int = 0) -> list[int]:
    request = pb.DecodeRequest(request_id=f"r{random.random()}", prompt_token_ids=prompt, session_id=session,
                               sampling=params_to_proto(PARAMS), pin_prefix_tokens=pin,
                               prefill=[pb.PrefillCandidate(id="p0", address=prefill)])
    async with grpc.aio.insecure_channel(decode) as channel:
        tokens = []
        async for message in pb_grpc.DecodeWorkerStub(channel).Generate(request, timeout=60):
            tokens += list(message.chunk.token_ids) if message.HasField("chunk") else []
        return tokens


async def test_turns_restore_the_session_locally_or_move_only_new_pages(workers, tiny_model_path) -> None:  # noqa: ANN001
    prefill, decode = workers
    rng = random.Random(5)
    system = [rng.randrange(3, 500) for _ in range(40)]
    additions = [[rng.randrange(3, 500) for _ in range(n)] for n in (50, 10, 60)]  # remote, local, remote
    history, prompts, got = list(system), [], []
    page_bytes = decode.engine.kv_cache.page_bytes
    for turn, added in enumerate(additions):
        history += added
        prompts.append(list(history))
        before = [await _call(w.address, "Status", pb.StatusRequest(), role) for w, role in
                  ((decode, "decode"), (prefill, "prefill"))]
        out = await _turn(decode.address, prefill.address, history, "chat-1", pin=len(system) if turn == 0 else 0)
        after = [await _call(w.address, "Status", pb.StatusRequest(), role) for w, role in
                 ((decode, "decode"), (prefill, "prefill"))]
        held = 0 if turn == 0 else len(prompts[-2]) + len(got[-1]) - 1  # the last turn's computed tokens
        decoded = after[0].prefill_tokens_total - before[0].prefill_tokens_total
        received = after[0].kv_bytes_received_total - before[0].kv_bytes_received_total
        if turn == 1:  # 10 new tokens + the reply's last: under the threshold, computed on decode only
            assert decoded == len(history) - held and received == 0
            assert after[1].prefill_tokens_total == before[1].prefill_tokens_total
        else:  # remote: decode receives the pages from the one its session's KV ends in
            pages = -(-len(history) // 8) - held // 8
            assert decoded == 0 and received == pages * page_bytes
        got.append(out)
        history += out
    expected = [r.outputs[0].token_ids for r in LLM(tiny_model_path, **ENGINE).generate(prompts, PARAMS)]
    assert got == expected
    status = await _call(decode.address, "Status", pb.StatusRequest())
    assert (status.sessions_open, status.session_restores_total) == (1, 2)
    for worker, role in ((decode, "decode"), (prefill, "prefill")):  # the request's pin landed on both
        status = await _call(worker.address, "Status", pb.StatusRequest(), role)
        assert (status.pinned_pages, status.pinned_pages_resident, len(status.pins)) == (5, 5, 1)
    assert (await _call(decode.address, "CloseSession", pb.CloseSessionRequest(session_id="chat-1"))).found
    assert not (await _call(decode.address, "CloseSession", pb.CloseSessionRequest(session_id="chat-1"))).found
    assert decode.engine.check_page_invariants().held_by_sessions == 0


async def test_pin_calls_and_bad_input(workers) -> None:  # noqa: ANN001
    prefill, decode = workers
    prefix = list(range(10, 50))  # 5 full pages of 8
    for worker, role in ((decode, "decode"), (prefill, "prefill")):
        reply = await _call(worker.address, "PinPrefix", pb.PinPrefixRequest(token_ids=prefix), role)
        assert (reply.pages_added, reply.pinned_pages, reply.resident_pages) == (5, 5, 0)
        assert (await _call(worker.address, "PinPrefix", pb.PinPrefixRequest(token_ids=prefix), role)).pages_added == 0
        for tokens, code, text in ((list(range(100, 200)), grpc.StatusCode.RESOURCE_EXHAUSTED, "cap of 16"),
                                   ([1, 2, 3], grpc.StatusCode.INVALID_ARGUMENT, "full page"),
                                   ([10**6] * 8, grpc.StatusCode.INVALID_ARGUMENT, "vocabulary")):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _call(worker.address, "PinPrefix", pb.PinPrefixRequest(token_ids=tokens), role)
            assert info.value.code() == code and text in info.value.details()
        assert (await _call(worker.address, "UnpinPrefix", pb.PinPrefixRequest(token_ids=prefix), role)).found
        reply = await _call(worker.address, "UnpinPrefix", pb.PinPrefixRequest(token_ids=prefix), role)
        assert not reply.found and reply.pinned_pages == 0
    for message, method, text in (
            (pb.CloseSessionRequest(session_id="a" * 129), "CloseSession", "at most 128"),
            (pb.CloseSessionRequest(session_id=""), "CloseSession", "must not be empty"),
            (pb.DecodeRequest(request_id="x", prompt_token_ids=[1, 2, 3], session_id="bad id",
                              sampling=params_to_proto(PARAMS)), "Generate", "only ASCII"),
            (pb.DecodeRequest(request_id="y", prompt_token_ids=[1, 2, 3], pin_prefix_tokens=4,
                              sampling=params_to_proto(PARAMS)), "Generate", "only 3 tokens")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with grpc.aio.insecure_channel(decode.address) as channel:
                call = getattr(pb_grpc.DecodeWorkerStub(channel), method)(message, timeout=30)
                if method == "Generate":
                    async for _ in call:
                        pass
                else:
                    await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.details()
