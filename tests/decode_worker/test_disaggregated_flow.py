"""Decode and prefill workers as real gRPC servers (in this process), KV over the real
tcp backend: greedy output equals the offline engine, prefill is retried on the next
candidate, and pages come back."""
from __future__ import annotations

import random

import grpc
import pytest

from decode_worker.server import serve_decode
from engine import LLM, SamplingParams
from prefill_worker.server import serve_prefill
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto.convert import params_to_proto
from worker.config import WorkerConfig
from worker.metrics import Sample
from worker.runtime import WorkerRuntime

pytestmark = pytest.mark.timeout(120)
ENGINE = {"page_size": 8, "num_pages": 256, "max_num_batched_tokens": 40}


@pytest.fixture
async def workers(tiny_model_path):  # noqa: ANN001, ANN201
    prefill = await serve_prefill(WorkerConfig(role="prefill", model=str(tiny_model_path), engine_options=ENGINE))
    decode = await serve_decode(WorkerConfig(role="decode", model=str(tiny_model_path), engine_options=ENGINE,
                                             local_prefill_threshold=16))
    yield prefill, decode
    await decode.stop()
    await prefill.stop()


async def _generate(decode_address: str, prompt: list[int], params: SamplingParams,
                    candidates: list[pb.PrefillCandidate]) -> tuple[list[int], pb.Finished]:
    async with grpc.aio.insecure_channel(decode_address) as channel:
        stub = pb_grpc.DecodeWorkerStub(channel)
        tokens: list[int] = []
        finished = None
        request = pb.DecodeRequest(request_id=f"r{random.random()}", prompt_token_ids=prompt,
                                   sampling=params_to_proto(params), prefill=candidates)
        async for message in stub.Generate(request, timeout=60):
            if message.HasField("chunk"):
                tokens.extend(message.chunk.token_ids)
            else:
                finished = message.finished
        assert finished is not None
        return tokens, finished


async def _status(address: str, role: str) -> pb.WorkerStatus:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = (pb_grpc.PrefillWorkerStub if role == "prefill" else pb_grpc.DecodeWorkerStub)(channel)
        return await stub.Status(pb.StatusRequest(), timeout=5)


def _prefill_counts(runtime: WorkerRuntime) -> dict[tuple[str, str], float]:
    """The decode worker's remote-prefill samples (as its /metrics shows them)."""
    return {(s.name, dict(s.labels).get("prefill", "")): s.value
            for source in runtime.metric_sources for s in source()
            if isinstance(s, Sample) and "prefill" in s.name}


async def test_remote_prefill_matches_offline(workers, tiny_model_path) -> None:  # noqa: ANN001
    prefill, decode = workers
    rng = random.Random(1)
    shared = [rng.randrange(3, 500) for _ in range(50)]
    prompts = [shared + [rng.randrange(3, 500) for _ in range(n)] for n in (3, 30, 90)] + [[7, 8, 9], list(range(3, 200))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [r.outputs[0].token_ids for r in LLM(tiny_model_path, **ENGINE).generate(prompts, params)]
    candidate = pb.PrefillCandidate(id="p0", address=prefill.address)
    got = [await _generate(decode.address, p, params, [candidate]) for p in prompts]
    assert [tokens for tokens, _ in got] == expected
    assert all(f.reason == pb.FINISH_REASON_LENGTH and f.usage.completion_tokens == 10 for _, f in got)
    p_status, d_status = await _status(prefill.address, "prefill"), await _status(decode.address, "decode")
    assert p_status.prefill_tokens_total > 0 and p_status.kv_bytes_sent_total > 0
    assert d_status.kv_bytes_received_total == p_status.kv_bytes_sent_total
    assert d_status.prefix_hit_tokens_total >= 48  # decode's own cache served the shared prefix
    for status in (p_status, d_status):
        assert status.running == 0 and status.waiting == 0
        assert status.kv_pages_free == status.kv_pages_total - status.kv_pages_cached


async def test_dead_prefill_candidate_is_skipped(workers, tiny_model_path) -> None:  # noqa: ANN001
    prefill, decode = workers
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = list(range(10, 120))
    expected = LLM(tiny_model_path, **ENGINE).generate(prompt, params)[0].outputs[0].token_ids
    dead = pb.PrefillCandidate(id="gone", address="127.0.0.1:1")
    tokens, finished = await _generate(decode.address, prompt, params, [dead, pb.PrefillCandidate(
        id="p0", address=prefill.address)])
    assert tokens == expected
    assert _prefill_counts(decode) == {
        ("remote_prefill_attempts_total", "127.0.0.1:1"): 1, ("remote_prefill_failures_total", "127.0.0.1:1"): 1,
        ("remote_prefill_attempts_total", prefill.address): 1, ("remote_prefill_failures_total", prefill.address): 0,
        ("remote_prefills_inflight", "127.0.0.1:1"): 0,
        ("remote_prefills_inflight", prefill.address): 0, ("prefill_retries_total", ""): 1,
        ("local_prefill_fallbacks_total", ""): 0}
    # With no live candidate at all, decode prefills locally.
    tokens, _ = await _generate(decode.address, list(range(20, 130)), params, [dead])
    assert len(tokens) == 6
    counts = _prefill_counts(decode)
    assert counts[("remote_prefill_failures_total", "127.0.0.1:1")] == 2
    assert counts[("prefill_retries_total", "")] == 1 and counts[("local_prefill_fallbacks_total", "")] == 1
    status = await _status(decode.address, "decode")
    assert status.kv_pages_free == status.kv_pages_total - status.kv_pages_cached


async def test_invalid_request_is_rejected(workers) -> None:  # noqa: ANN001
    _, decode = workers
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _generate(decode.address, [], SamplingParams(max_tokens=3), [])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt is empty" in info.value.details()
