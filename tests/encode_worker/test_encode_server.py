"""The encode worker as prefill talks to it: a real gRPC server, a real tcp transfer
backend on each side; embeddings checked byte for byte against the vision encoder."""
from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import torch
from PIL import Image

from encode_worker.server import EncodeRuntime, serve_encode
from engine.multimodal import image_hash
from engine.vision_encoder import VisionEncoder
from kv_transfer import create_backend
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from worker.config import WorkerConfig
from worker.embeddings import EMB_REGION, embedding_buffer, embedding_compat_hash

pytestmark = pytest.mark.timeout(120)


def png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def vlm_path() -> Path:
    from engine.model_path import default_vlm_path
    return default_vlm_path()


class Receiver:
    """Prefill's end: an embedding buffer in a tcp backend, one room per image."""

    def __init__(self, vlm_path: Path, encoder: VisionEncoder, slots: int = 8) -> None:
        info = encoder.info
        self.buffer = embedding_buffer(info, slots, encoder.dtype, "cpu")
        compat = embedding_compat_hash(vlm_path, info, str(encoder.dtype).removeprefix("torch."))
        self.backend = create_backend("tcp", compat_hash=compat, host="127.0.0.1")
        self.generation = 0

    async def start(self) -> None:
        await self.backend.start()
        await self.backend.register_region(EMB_REGION, self.buffer)

    def destination(self, slot: int, release: bool = False) -> pb.KVDestination:
        self.generation += 1
        room = f"test/{slot}#{self.generation}"
        self.backend.reserve_room(room, self.generation, EMB_REGION, [slot])
        if release:
            self.backend.release_room(room)
        return pb.KVDestination(endpoint_json=json.dumps(self.backend.descriptor().to_dict()), room_id=room,
                                generation=self.generation, page_ids=[slot], region=EMB_REGION)


@pytest_asyncio.fixture
async def worker(vlm_path: Path) -> AsyncIterator[tuple[EncodeRuntime, pb_grpc.EncodeWorkerStub, Receiver]]:
    config = WorkerConfig(role="encode", model=str(vlm_path), transfer="tcp", encode_max_batch=4,
                          embedding_slots=2, transfer_timeout_s=5.0)
    runtime = await serve_encode(config)
    receiver = Receiver(vlm_path, runtime.encoder)
    await receiver.start()
    async with grpc.aio.insecure_channel(runtime.address) as channel:
        yield runtime, pb_grpc.EncodeWorkerStub(channel), receiver
    await runtime.stop()
    await receiver.backend.close()


def image_data(data: bytes, num_tokens: int) -> pb.ImageData:
    return pb.ImageData(data=data, hash=image_hash(data), offset=0, num_tokens=num_tokens)


async def test_embeddings_land_byte_exact_and_repeats_hit_the_cache(worker) -> None:  # noqa: ANN001
    runtime, stub, receiver = worker
    n = runtime.info.num_image_tokens
    data = png(1)
    reference = VisionEncoder.from_pretrained(runtime.model_path).encode_images([data])[0]
    first = await stub.Encode(pb.EncodeRequest(request_id="r", image=image_data(data, n),
                                               destination=receiver.destination(3)), timeout=30)
    await receiver.backend.wait_final(f"test/3#{receiver.generation}", timeout=5)
    assert not first.cache_hit and first.num_tokens == n
    assert first.embedding_bytes == reference.numel() * reference.element_size()
    assert torch.equal(receiver.buffer[3], reference.to(receiver.buffer.dtype))
    assert not receiver.buffer[2].any()  # nothing outside the reserved slot
    second = await stub.Encode(pb.EncodeRequest(request_id="r2", image=image_data(data, n),
                                                destination=receiver.destination(5)), timeout=30)
    assert second.cache_hit and torch.equal(receiver.buffer[5], receiver.buffer[3])
    status = await stub.Status(pb.StatusRequest(), timeout=5)
    assert (status.role, status.images_encoded_total, status.embedding_cache_hits_total) == ("encode", 1, 1)
    assert status.embedding_cache_entries == 1 and status.embedding_slots_free == status.embedding_slots_total == 2
    assert status.embedding_bytes_sent_total == 2 * first.embedding_bytes
    assert (await stub.FlushCache(pb.FlushCacheRequest(), timeout=5)).pages_freed == 1


async def test_concurrent_images_share_forwards(worker) -> None:  # noqa: ANN001
    runtime, stub, receiver = worker
    n = runtime.info.num_image_tokens
    datas = [png(10 + i) for i in range(8)]
    calls = [stub.Encode(pb.EncodeRequest(request_id=f"c{i}", image=image_data(d, n),
                                          destination=receiver.destination(i)), timeout=30)
             for i, d in enumerate(datas)]
    await asyncio.gather(*calls)
    reference = VisionEncoder.from_pretrained(runtime.model_path).encode_images(datas)
    for i, expected in enumerate(reference):
        # Batched and single forwards may round differently; each image is its own row.
        torch.testing.assert_close(receiver.buffer[i], expected.to(receiver.buffer.dtype), rtol=1e-5, atol=1e-5)
    assert runtime.batcher.images_encoded_total == 8
    assert runtime.batcher.batches_total < 8  # images of different calls went through one forward


@pytest.mark.parametrize("case", ["not_an_image", "truncated", "wrong_hash", "wrong_tokens", "no_slot"])
async def test_bad_requests_are_invalid_argument(worker, case: str) -> None:  # noqa: ANN001
    runtime, stub, receiver = worker
    n = runtime.info.num_image_tokens
    good = png(2)
    image = {"not_an_image": image_data(b"hello, not an image", n),
             "truncated": image_data(good[: len(good) // 2], n),
             "wrong_hash": pb.ImageData(data=good, hash="0" * 64, num_tokens=n),
             "wrong_tokens": image_data(good, n + 1),
             "no_slot": image_data(good, n)}[case]
    destination = receiver.destination(1)
    if case == "no_slot":
        del destination.page_ids[:]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Encode(pb.EncodeRequest(request_id="bad", image=image, destination=destination), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = {"not_an_image": "not an image", "truncated": "truncated", "wrong_hash": "sha256",
                "wrong_tokens": "tokens", "no_slot": "slot"}[case]
    assert expected in error.value.details()
    # The worker keeps serving, and gave its staging slot back.
    ok = await stub.Encode(pb.EncodeRequest(request_id="ok", image=image_data(good, n),
                                            destination=receiver.destination(4)), timeout=30)
    assert ok.num_tokens == n and runtime.slots.free == runtime.slots.total


async def test_a_released_room_is_fenced(worker) -> None:  # noqa: ANN001
    runtime, stub, receiver = worker
    n = runtime.info.num_image_tokens
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Encode(pb.EncodeRequest(request_id="late", image=image_data(png(3), n),
                                           destination=receiver.destination(6, release=True)), timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not receiver.buffer[6].any()
    assert runtime.slots.free == runtime.slots.total
