"""A decode worker taking over a migrated request (`resume_token_ids`), a stalled
prefill candidate, and the bounded admission queue: real in-process gRPC workers,
KV over the real tcp backend, outputs against the offline engine."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from decode_worker.server import serve_decode
from engine import LLM, SamplingParams
from kv_transfer.faults import STALL_ENV
from prefill_worker.server import serve_prefill
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto.convert import params_to_proto
from worker.config import WorkerConfig

pytestmark = pytest.mark.timeout(120)
ENGINE = {"page_size": 8, "num_pages": 256, "max_num_batched_tokens": 40}
PROMPT = list(range(30, 150))
PARAMS = {"greedy": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
          "seeded": SamplingParams(temperature=0.8, seed=77, max_tokens=12, ignore_eos=True)}


async def _stream(address: str, request: pb.DecodeRequest) -> list[pb.DecodeResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        return [m async for m in pb_grpc.DecodeWorkerStub(channel).Generate(request, timeout=60)]


def _request(rid: str, params: SamplingParams, resumed: list[int], prefill: list[pb.PrefillCandidate],
             force: bool = False) -> pb.DecodeRequest:
    return pb.DecodeRequest(request_id=rid, prompt_token_ids=PROMPT, sampling=params_to_proto(params),
                            prefill=prefill, resume_token_ids=resumed, force_remote_prefill=force)


def _tokens(messages: list[pb.DecodeResponse]) -> list[int]:
    return [t for m in messages if m.HasField("chunk") for t in m.chunk.token_ids]


@pytest.fixture(scope="module")
def expected(tiny_model_path) -> dict[str, list[int]]:  # noqa: ANN001
    llm = LLM(tiny_model_path, **ENGINE)
    return {kind: llm.generate([PROMPT], params)[0].outputs[0].token_ids for kind, params in PARAMS.items()}


async def test_resumed_request_continues_locally_and_through_prefill(tiny_model_path, expected) -> None:  # noqa: ANN001
    prefill = await serve_prefill(WorkerConfig(role="prefill", model=str(tiny_model_path), engine_options=ENGINE))
    decode = await serve_decode(WorkerConfig(role="decode", model=str(tiny_model_path), engine_options=ENGINE))
    try:
        candidate = pb.PrefillCandidate(id="p0", address=prefill.address)
        for kind, params in PARAMS.items():
            full = expected[kind]
            for split, remote in ((5, True), (9, False)):
                messages = await _stream(decode.address, _request(f"{kind}{split}", params, full[:split],
                                                                  [candidate] if remote else [], force=remote))
                assert _tokens(messages) == full[split:], (kind, split, remote)
                finished = messages[-1].finished
                assert finished.reason == pb.FINISH_REASON_LENGTH and finished.usage.completion_tokens == 12
                attempts = list(messages[0].prefill_attempts)
                assert [(a.id, a.ok) for a in attempts] == ([("p0", True)] if remote else [])
        # Streamed tokens that already end the request: only the finish comes back.
        messages = await _stream(decode.address, _request("done", PARAMS["greedy"], expected["greedy"], []))
        assert len(messages) == 1 and messages[0].finished.reason == pb.FINISH_REASON_LENGTH
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _stream(decode.address, _request("bad", PARAMS["greedy"], [10**6], []))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for runtime in (prefill, decode):
            acct = runtime.engine.check_page_invariants()
            assert acct.held_by_requests == 0
    finally:
        await decode.stop()
        await prefill.stop()


async def _stalled_and_good(model: Path, stall: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    """A prefill worker that stalls mid-transfer while `stall` exists (its own transfer
    timeout 30 s), and a healthy one."""
    stall.touch()
    monkeypatch.setenv(STALL_ENV, str(stall))  # armed for the first prefill worker only
    stuck = await serve_prefill(WorkerConfig(role="prefill", model=str(model), engine_options=ENGINE,
                                             transfer_timeout_s=30.0))
    monkeypatch.delenv(STALL_ENV)
    good = await serve_prefill(WorkerConfig(role="prefill", model=str(model), engine_options=ENGINE))
    return stuck, good


async def _forced_remote(decode, stuck, good) -> tuple[list[pb.DecodeResponse], float]:  # noqa: ANN001
    """One greedy request forced to prefill remotely, the stalled worker first: its
    messages and how long it took."""
    candidates = [pb.PrefillCandidate(id="stuck", address=stuck.address),
                  pb.PrefillCandidate(id="good", address=good.address)]
    start = time.monotonic()
    messages = await _stream(decode.address, _request("s", PARAMS["greedy"], [], candidates, force=True))
    return messages, time.monotonic() - start


async def test_stalled_prefill_is_given_up_within_the_transfer_timeout(
        tiny_model_path, expected, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    stall = tmp_path / "stall"
    stuck, good = await _stalled_and_good(tiny_model_path, stall, monkeypatch)
    decode = await serve_decode(WorkerConfig(role="decode", model=str(tiny_model_path), engine_options=ENGINE,
                                             transfer_timeout_s=1.0))
    try:
        messages, elapsed = await _forced_remote(decode, stuck, good)
        assert _tokens(messages) == expected["greedy"]
        # Decode gave up on the stalled worker after its own 1 s, not the worker's 30 s.
        assert 1.0 <= elapsed < 5.0, elapsed
        attempts = [(a.id, a.ok, a.code) for a in messages[0].prefill_attempts]
        assert attempts == [("stuck", False, "TIMEOUT"), ("good", True, "")]
        # The stalled worker was told to stop (the call was cancelled) and holds nothing.
        for _ in range(100):
            if stuck.engine.check_page_invariants().held_by_requests == 0 and not stuck.engine.requests:
                break
            await asyncio.sleep(0.05)
        assert stuck.engine.check_page_invariants().held_by_requests == 0
    finally:
        stall.unlink()
        for runtime in (decode, good, stuck):
            await runtime.stop()


async def test_prefill_start_timeout_bounds_the_first_chunk_instead(
        tiny_model_path, expected, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """`--prefill-start-timeout` (a prefill pool that queues long prompts): the first chunk
    may take that long, while the transfer timeout still bounds the chunks after it."""
    stall = tmp_path / "stall"
    stuck, good = await _stalled_and_good(tiny_model_path, stall, monkeypatch)
    decode = await serve_decode(WorkerConfig(role="decode", model=str(tiny_model_path), engine_options=ENGINE,
                                             transfer_timeout_s=0.5, prefill_start_timeout_s=2.5))
    try:
        messages, elapsed = await _forced_remote(decode, stuck, good)
        assert _tokens(messages) == expected["greedy"]
        assert 2.5 <= elapsed < 6.0, elapsed  # the start timeout, not the 0.5 s transfer timeout
        attempts = [(a.id, a.ok, a.code) for a in messages[0].prefill_attempts]
        assert attempts == [("stuck", False, "TIMEOUT"), ("good", True, "")]
    finally:
        stall.unlink()
        for runtime in (decode, good, stuck):
            await runtime.stop()


def test_prefill_start_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="--prefill-start-timeout must be > 0"):
        WorkerConfig(role="decode", prefill_start_timeout_s=0.0)


async def test_full_decode_worker_refuses_with_resource_exhausted(tiny_model_path) -> None:  # noqa: ANN001
    decode = await serve_decode(WorkerConfig(role="decode", model=str(tiny_model_path),
                                             engine_options={**ENGINE, "max_num_seqs": 1}, max_queued_requests=1))
    try:
        slow = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        running = [asyncio.create_task(_stream(decode.address, _request(f"r{i}", slow, [], []))) for i in range(2)]
        while decode.life.gate.inflight < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _stream(decode.address, _request("third", slow, [], []))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(info.value.trailing_metadata() or ()).get("retry-after") == "1"
        assert decode.life.gate.refused_total == 1
        for messages in await asyncio.gather(*running):  # the two admitted ones finish
            assert len(_tokens(messages)) == 400
    finally:
        await decode.stop()
