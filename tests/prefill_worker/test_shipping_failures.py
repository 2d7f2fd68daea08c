"""The prefill worker (a real gRPC server in this process) shipping a long prompt's KV
into a real receiver endpoint of each CPU transfer backend, when that receiver goes away
mid-prompt: the Prefill call fails within the transfer timeout, computing stops, every
held page comes back, and the worker serves the next request."""
from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
import torch

import tests.kv_transfer.support  # noqa: F401 - loopback network paths for NIXL/Mooncake, set before any engine
from engine import LLM, SamplingParams
from kv_transfer import TransferBackend, backend_availability, create_backend
from prefill_worker.server import serve_prefill
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto.convert import params_to_proto
from worker.config import WorkerConfig
from worker.runtime import KV_REGION, WorkerRuntime

pytestmark = pytest.mark.timeout(120)
# 8-token chunks: a 1000-token prompt takes 125 steps, each shipped on its own.
ENGINE = {"page_size": 16, "num_pages": 256, "max_num_batched_tokens": 8}
TRANSFER_TIMEOUT_S = 3.0
PARAMS = SamplingParams(temperature=0, max_tokens=4)


@pytest.fixture(params=["tcp", "mooncake", "nixl"])
async def prefill(request: pytest.FixtureRequest, tiny_model_path):  # noqa: ANN001, ANN201
    if backend_availability()[request.param] is not None:
        pytest.skip(f"transfer backend {request.param} is not installed here")
    runtime = await serve_prefill(WorkerConfig(role="prefill", model=str(tiny_model_path), transfer=request.param,
                                               transfer_timeout_s=TRANSFER_TIMEOUT_S, engine_options=ENGINE))
    yield runtime
    await runtime.stop()


async def _receiver(runtime: WorkerRuntime) -> TransferBackend:
    """A decode-side endpoint: same backend and KV layout, its own pages."""
    backend = create_backend(runtime.config.transfer, compat_hash=runtime.compat_hash(), host="127.0.0.1")
    await backend.start()
    await backend.register_region(KV_REGION, torch.zeros_like(runtime.engine.kv_cache.buffer))
    return backend


def _prefill_request(rid: str, prompt: list[int], receiver: TransferBackend, room: str) -> pb.PrefillRequest:
    pages = -(-len(prompt) // ENGINE["page_size"])
    receiver.reserve_room(room, 1, KV_REGION, range(pages))
    destination = pb.KVDestination(endpoint_json=json.dumps(receiver.descriptor().to_dict()), room_id=room,
                                   generation=1, start_page=0, page_ids=list(range(pages)), region=KV_REGION)
    return pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=params_to_proto(PARAMS),
                             destination=destination)


async def _status(stub: pb_grpc.PrefillWorkerStub) -> pb.WorkerStatus:
    return await stub.Status(pb.StatusRequest(), timeout=5)


def _ship_counts(runtime: WorkerRuntime, destination: str) -> dict[str, float]:
    return {s.name: s.value for source in runtime.metric_sources for s in source()
            if dict(s.labels).get("decode") == destination}


async def test_receiver_gone_mid_prompt_fails_fast_and_frees_pages(prefill: WorkerRuntime, tiny_model_path) -> None:  # noqa: ANN001
    prompt = [3 + (i * 37) % 497 for i in range(1000)]
    receiver = await _receiver(prefill)
    destination = receiver.descriptor().address
    async with grpc.aio.insecure_channel(prefill.address) as channel:
        stub = pb_grpc.PrefillWorkerStub(channel)
        call = asyncio.ensure_future(stub.Prefill(_prefill_request("gone", prompt, receiver, "gone#1"), timeout=60))
        await receiver.wait_notification("gone#1", timeout=30)  # the first chunk has landed
        closed = time.monotonic()
        await receiver.close()  # the decode side is gone; its gRPC caller is still waiting
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert time.monotonic() - closed <= TRANSFER_TIMEOUT_S + 1.0
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert "KV transfer failed" in info.value.details()
        status = await _status(stub)
        # It stopped computing the prompt for nobody, and gave every page back.
        assert status.prefill_tokens_total < len(prompt)
        assert status.running == 0 and status.waiting == 0
        assert status.kv_pages_free == status.kv_pages_total - status.kv_pages_cached
        assert _ship_counts(prefill, destination) == {"kv_ship_jobs": 0, "kv_ship_failed_total": 1,
                                                      "kv_ship_delivered_total": 0, "kv_ship_cancelled_total": 0}

        # The worker keeps serving: a new destination gets the whole prompt and the
        # offline engine's first token.
        other = await _receiver(prefill)
        try:
            again = prompt[:300]
            response = await stub.Prefill(_prefill_request("next", again, other, "next#1"), timeout=60)
            assert (await other.wait_final("next#1", timeout=10)).final
            expected = LLM(tiny_model_path, **ENGINE).generate(again, PARAMS)[0].outputs[0].token_ids[0]
            assert response.first_token == expected
            assert _ship_counts(prefill, other.descriptor().address) == {
                "kv_ship_jobs": 0, "kv_ship_delivered_total": 1, "kv_ship_failed_total": 0, "kv_ship_cancelled_total": 0}
        finally:
            await other.close()
