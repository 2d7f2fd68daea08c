"""Prefill's side of the encode pool: gets each image's embeddings before the prompt
is queued.

Per image, in order of preference: prefill's own embedding cache (by image hash); the
request's encode workers, tried in the router's order, each writing into a slot of
prefill's embedding buffer that is reserved for that one attempt (room + generation,
released whatever happens, so a late write from a given-up encoder is fenced off);
and when none is given or every one failed, the image's bytes go to the engine, which
runs the vision tower here (aggregated encode). Images of a request are fetched
concurrently; requests never wait on each other's images beyond the slot count.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
from dataclasses import dataclass

import grpc
import torch

from engine.engine import Engine
from engine.multimodal import ImageInput
from kv_transfer import TransferBackend, TransferError, create_backend
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto import tracing
from proto.auth import cluster_channel
from worker.config import GRPC_MESSAGE_OPTIONS, WorkerConfig
from worker.embeddings import EMB_REGION, EmbeddingCache, SlotPool, embedding_buffer, embedding_compat_hash
from worker.runtime import _maybe_await

logger = logging.getLogger(__name__)


@dataclass
class ImageCounters:
    from_encoders_total: int = 0
    encoder_failures_total: int = 0
    local_fallbacks_total: int = 0  # images left to this worker's own vision tower


class ImageFetcher:
    def __init__(self, engine: Engine, config: WorkerConfig) -> None:
        info = engine.multimodal
        assert info is not None
        self.engine = engine
        self.config = config
        dtype = engine.model_config.dtype
        # Its own backend: the KV backend's compatibility hash is about KV pages. Any fixed
        # transfer port belongs to the KV backend; this one takes a free port.
        options = {k: v for k, v in config.transfer_options.items() if k != "port"}
        self.transfer: TransferBackend = create_backend(
            config.transfer, compat_hash=embedding_compat_hash(engine.model_path, info, dtype),
            host=config.host, advertise_host=config.public_host, **options)
        self.buffer = embedding_buffer(info, config.embedding_slots, engine.model_config.torch_dtype, engine.device)
        self.slots = SlotPool(config.embedding_slots)
        self.cache = EmbeddingCache(int(config.embedding_cache_mb * 2**20))
        self.counters = ImageCounters()
        self._generations = itertools.count(1)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._endpoint_json = ""

    async def start(self) -> None:
        await _maybe_await(self.transfer.start())
        await _maybe_await(self.transfer.register_region(EMB_REGION, self.buffer))
        self._endpoint_json = json.dumps(self.transfer.descriptor().to_dict())

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        await _maybe_await(self.transfer.close())

    def counts(self) -> dict[str, int]:
        return dict(embedding_cache_hits_total=self.cache.hits_total,
                    embedding_bytes_received_total=self.transfer.bytes_received_total,
                    embedding_slots_total=self.slots.total, embedding_slots_free=self.slots.free,
                    embedding_cache_entries=len(self.cache))

    async def fetch(self, request_id: str, images: list[pb.ImageData], inputs: list[ImageInput],
                    span: tracing.TraceSpan = tracing.NO_SPAN) -> list[ImageInput]:
        """`inputs` (one per image, with data) with the embedding filled in wherever the
        cache or an encode worker had it; the rest keep their bytes for the engine."""
        return list(await asyncio.gather(*(self._one(request_id, index, message, image, span)
                                           for index, (message, image) in enumerate(zip(images, inputs)))))

    async def _one(self, request_id: str, index: int, message: pb.ImageData, image: ImageInput,
                   span: tracing.TraceSpan) -> ImageInput:
        cached = self.cache.get(image.hash)
        if cached is not None:
            span.event("embedding_cache_hit", image=index)
            return image.with_embedding(cached)
        for encoder in message.encoders:
            attempt = tracing.start("prefill.encode_image", span, "client", image=index, encoder=encoder.address)
            try:
                embedding = await self._attempt(request_id, index, encoder, message, attempt)
            finally:
                attempt.end()
            if embedding is not None:
                self.counters.from_encoders_total += 1
                self.cache.put(image.hash, embedding)
                return image.with_embedding(embedding)
            self.counters.encoder_failures_total += 1
        self.counters.local_fallbacks_total += 1
        return image

    async def _attempt(self, request_id: str, index: int, encoder: pb.WorkerCandidate,
                       message: pb.ImageData, span: tracing.TraceSpan) -> torch.Tensor | None:
        """One encode worker writes the image into a slot reserved for this attempt."""
        timeout = self.config.transfer_timeout_s
        try:
            slot = await self.slots.acquire(timeout)
        except asyncio.TimeoutError:
            logger.warning("no free embedding slot for %s image %d", request_id, index)
            return None
        generation = next(self._generations)
        room = f"{request_id}/image{index}#{generation}"
        self.transfer.reserve_room(room, generation, EMB_REGION, [slot])
        try:
            destination = pb.KVDestination(endpoint_json=self._endpoint_json, room_id=room, generation=generation,
                                           start_page=0, page_ids=[slot], region=EMB_REGION)
            image = pb.ImageData(data=message.data, hash=message.hash, offset=message.offset,
                                 num_tokens=message.num_tokens)
            stub = pb_grpc.EncodeWorkerStub(self._channel(encoder.address))
            await stub.Encode(pb.EncodeRequest(request_id=request_id, image=image, destination=destination),
                              timeout=self.config.prefill_timeout_s, metadata=span.metadata())
            await self.transfer.wait_final(room, timeout=timeout)
            return self.buffer[slot].clone()
        except (grpc.aio.AioRpcError, TransferError, asyncio.TimeoutError) as exc:
            logger.warning("encode worker %s failed on %s image %d: %s", encoder.address, request_id, index,
                           _short(exc))
            span.fail(_short(exc))
            return None
        finally:
            self.transfer.release_room(room)
            await self.slots.release(slot)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = cluster_channel(address, GRPC_MESSAGE_OPTIONS, self.config.cluster_token)
        return self._channels[address]


def _short(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)
