"""The encode worker: runs the vision tower + projector on images and writes each
image's embeddings into a slot of the prefill worker's embedding buffer.

Per image (one `Encode` call): the embedding cache by image hash, else the batcher
(images of concurrent calls share forwards); then the embedding is copied into one of
this worker's staging slots and written, as one page run, into the slot prefill
reserved, fenced by prefill's room and generation like KV pages. The call returns once
the bytes have landed. The worker holds no state per request beyond the call.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import torch
from prometheus_client import CollectorRegistry

from encode_worker.batcher import EncodeBatcher
from engine.errors import ConfigError, InvalidRequestError
from engine.multimodal import InvalidImageError, image_hash
from kv_transfer import EndpointDescriptor, Notification, PageRun, PeerHandle, TransferBackend, TransferError, create_backend
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto import tracing
from proto.keepalive import SERVER_OPTIONS as SERVER_KEEPALIVE
from worker.auth import server_interceptors
from worker.config import GRPC_MESSAGE_OPTIONS, WorkerConfig
from worker.embeddings import EMB_REGION, EmbeddingCache, SlotPool, embedding_buffer, embedding_compat_hash
from worker.drain import Lifecycle
from worker.http import WorkerHTTPServer
from worker.metrics import REQUEST_BUCKETS, DurationHistogram, families, status_samples
from worker.registration import deregister, register_loop
from worker.runtime import _maybe_await

logger = logging.getLogger(__name__)


def resolve_vlm_path(model: str | None) -> Path:
    """The encode pool's default is the built-in tiny vision-language model."""
    if model in (None, "", "tiny-vlm"):
        from engine.model_path import default_vlm_path
        return default_vlm_path()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model directory not found: {model}")
    return path


class EncodeRuntime:
    """What the encode worker process owns: the vision encoder, its batcher and cache,
    the staging slots in a transfer backend, the gRPC server, registration, /metrics."""

    def __init__(self, config: WorkerConfig) -> None:
        from engine.vision_encoder import VisionEncoder
        if config.transfer == "none":
            raise ValueError("an encode worker needs a transfer backend (--transfer)")
        self.config = config
        self.model_path = resolve_vlm_path(config.model)
        options = config.engine_options
        self.encoder = VisionEncoder.from_pretrained(self.model_path, options.get("device", "cpu"),
                                                     options.get("dtype"))
        self.info = self.encoder.info
        self.batcher = EncodeBatcher(self.encoder, config.encode_max_batch)
        self.cache = EmbeddingCache(int(config.embedding_cache_mb * 2**20))
        self.slots = SlotPool(config.embedding_slots)
        self.staging = embedding_buffer(self.info, config.embedding_slots, self.encoder.dtype, self.encoder.device)
        dtype = str(self.encoder.dtype).removeprefix("torch.")
        self.transfer: TransferBackend = create_backend(
            config.transfer, compat_hash=embedding_compat_hash(self.model_path, self.info, dtype),
            host=config.host, advertise_host=config.public_host, **config.transfer_options)
        self.server = grpc.aio.server(options=[*GRPC_MESSAGE_OPTIONS, *SERVER_KEEPALIVE],
                                      interceptors=server_interceptors(config.cluster_token))
        self.port = 0
        self.requests_total = 0
        self._tasks: list[asyncio.Task[None]] = []
        # Readiness, the drain gate (bounded: see WorkerConfig.max_queued_requests), exit on request.
        self.life = Lifecycle(config.drain_timeout_s, config.encode_max_batch + config.max_queued_requests)
        self.life.gate.durations = DurationHistogram("request_duration_seconds", REQUEST_BUCKETS)
        self._http: WorkerHTTPServer | None = None

    @property
    def worker_id(self) -> str:
        return self.config.worker_id or f"encode-{self.port}"

    @property
    def address(self) -> str:
        return f"{self.config.public_host}:{self.port}"

    async def start(self) -> None:
        await _maybe_await(self.transfer.start())
        await _maybe_await(self.transfer.register_region(EMB_REGION, self.staging))
        self.batcher.start()
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await self.server.start()
        self.life.gate.worker_id = self.worker_id
        if self.config.metrics_port is not None:
            registry = CollectorRegistry()
            registry.register(_EncodeCollector(self))
            self._http = WorkerHTTPServer(self.config.host, self.config.metrics_port, registry, self.life.health)
        self.life.ready = True
        if self.config.router:
            self._tasks.append(asyncio.create_task(register_loop(
                self.config.router, "encode", self.worker_id, self.address, self.config.heartbeat_interval_s,
                self.config)))
        logger.info("encode worker %s listening on %s (%d image tokens per image)", self.worker_id,
                    self.address, self.info.num_image_tokens)

    async def stop(self) -> None:
        self.life.ready = False
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.config.router:
            await deregister(self.config.router, self.worker_id, self.config)
        await self.server.stop(grace=1.0)
        if self._http is not None:
            self._http.close()
        await self.batcher.stop()
        await _maybe_await(self.transfer.close())

    def counts(self) -> dict[str, int]:
        return dict(
            images_encoded_total=self.batcher.images_encoded_total,
            embedding_cache_hits_total=self.cache.hits_total,
            queued_images=self.batcher.queued,
            embedding_bytes_sent_total=self.transfer.bytes_sent_total,
            embedding_slots_total=self.slots.total, embedding_slots_free=self.slots.free,
            embedding_cache_entries=len(self.cache), requests_total=self.requests_total)

    def status(self) -> pb.WorkerStatus:
        return pb.WorkerStatus(
            role="encode", id=self.worker_id, address=self.address, healthy=True, model=str(self.model_path),
            metrics_address=f"{self.config.public_host}:{self._http.port if self._http else 0}",
            transfer=self.config.transfer, transfer_address=self.transfer.descriptor().address,
            draining=self.life.gate.draining, **self.counts())


class EncodeService(pb_grpc.EncodeWorkerServicer):
    def __init__(self, runtime: EncodeRuntime) -> None:
        self.runtime = runtime

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        span = tracing.start("encode.encode", context.invocation_metadata(), "server", request_id=request.request_id,
                             worker=self.runtime.worker_id, image_hash=request.image.hash[:16])
        try:
            async with self.runtime.life.gate.admit(context):
                response = await self._encode(request, context)
            span.set(cache_hit=response.cache_hit, embedding_bytes=response.embedding_bytes)
            return response
        except BaseException as exc:
            span.fail(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            span.end()

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        return await self.runtime.life.drain_call(request)

    async def _encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        runtime = self.runtime
        runtime.requests_total += 1
        try:
            self._check(request)
            peer = await self._connect(request.destination)
            embedding, hit = await self._embedding(request.image)
        except (InvalidRequestError, InvalidImageError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except TransferError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot reach the embedding destination: {exc}")
        try:
            sent = await self._write(peer, request.destination, embedding)
        except TransferError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"embedding transfer failed: {exc}")
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free embedding staging slot in time")
        return pb.EncodeResponse(num_tokens=embedding.shape[0], embedding_bytes=sent, cache_hit=hit)

    def _check(self, request: pb.EncodeRequest) -> None:
        image, dst, info = request.image, request.destination, self.runtime.info
        if not image.data:
            raise InvalidRequestError("the image has no data")
        if image_hash(image.data) != image.hash:
            raise InvalidRequestError("the image's hash is not the sha256 of its data")
        if image.num_tokens != info.num_image_tokens:
            raise InvalidRequestError(f"the image covers {image.num_tokens} tokens; this model's images "
                                      f"have {info.num_image_tokens}")
        if not dst.endpoint_json or not dst.room_id or len(dst.page_ids) != 1:
            raise InvalidRequestError("the destination needs endpoint_json, room_id and exactly one slot")
        if (dst.region or EMB_REGION) != EMB_REGION:
            raise InvalidRequestError(f"the destination region must be {EMB_REGION!r}")

    async def _connect(self, dst: pb.KVDestination) -> PeerHandle:
        try:
            descriptor = EndpointDescriptor.from_dict(json.loads(dst.endpoint_json))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequestError(f"malformed destination endpoint: {exc}") from exc
        return await self.runtime.transfer.connect(descriptor, timeout=self.runtime.config.transfer_timeout_s)

    async def _embedding(self, image: pb.ImageData) -> tuple[torch.Tensor, bool]:
        cached = self.runtime.cache.get(image.hash)
        if cached is not None:
            return cached, True
        embedding = await self.runtime.batcher.encode(image.hash, image.data)
        self.runtime.cache.put(image.hash, embedding)
        return embedding, False

    async def _write(self, peer: PeerHandle, dst: pb.KVDestination, embedding: torch.Tensor) -> int:
        runtime, timeout = self.runtime, self.runtime.config.transfer_timeout_s
        slot = await runtime.slots.acquire(timeout)
        try:
            runtime.staging[slot].copy_(embedding)
            if runtime.staging.device.type == "cuda":  # the backend reads the slot from its own stream
                torch.cuda.current_stream(runtime.staging.device).synchronize()
            note = Notification(room_id=dst.room_id, generation=dst.generation, seq=0, final=True)
            return int(await runtime.transfer.write(
                peer, room_id=dst.room_id, generation=dst.generation, region=EMB_REGION,
                runs=[PageRun(slot, dst.page_ids[0], 1)], notification=note, timeout=timeout) or 0)
        finally:
            await runtime.slots.release(slot)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStatus:
        return self.runtime.status()

    async def FlushCache(self, request: pb.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> pb.FlushCacheResponse:
        return pb.FlushCacheResponse(pages_freed=self.runtime.cache.clear())


_COUNTERS = ("images_encoded_total", "embedding_cache_hits_total", "embedding_bytes_sent_total", "requests_total")


class _EncodeCollector:
    def __init__(self, runtime: EncodeRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Any:  # prometheus collector protocol
        runtime = self.runtime
        labels = {"pool": "encode", "worker": runtime.worker_id, "model": Path(str(runtime.model_path)).name}
        samples = [*status_samples(runtime.counts(), _COUNTERS, None), *runtime.life.gate.durations.samples()]
        yield from families(samples, labels)


async def serve_encode(config: WorkerConfig) -> EncodeRuntime:
    runtime = EncodeRuntime(config)
    pb_grpc.add_EncodeWorkerServicer_to_server(EncodeService(runtime), runtime.server)
    await runtime.start()
    return runtime
