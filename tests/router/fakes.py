"""Test doubles of the workers: grpc.aio servers implementing the DecodeWorker and
PrefillWorker services with scripted behaviour, recording what the router did."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from decode_worker.mux import serve_stream
from engine.radix_cache import page_hashes
from proto import epd_pb2, epd_pb2_grpc

SCRIPT_TEXT = "Hello world! The quick brown fox jumps over the lazy dog. "


@dataclass
class DecodeBehaviour:
    """What the fake decode worker does with a request."""

    script: list[int] = field(default_factory=list)  # tokens to emit, cycled up to max_tokens
    token_delay: float = 0.0  # before each chunk
    first_token_delay: float = 0.0
    chunk_size: int = 1
    fail_before_first: grpc.StatusCode | None = None  # abort the RPC before any token
    fail_after: int | None = None  # abort with UNAVAILABLE after this many tokens (of one call)
    finish_error: str | None = None  # end with Finished(ERROR) after the tokens
    eos_at: int | None = None  # emit this many tokens then stop with stop_token eos_id
    eos_id: int = 0
    cached_tokens: int = 0
    token_limit: int | None = None  # emit at most this many tokens
    # Report remote prefill attempts with the first chunk, as decode does: candidates in
    # order up to the first one that is not `failing_prefill`, which failed with this code.
    prefill_failure: str | None = None
    failing_prefill: str = "p0"


@dataclass
class StatusFields:
    kv_pages_total: int = 1000
    kv_pages_free: int = 1000
    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    page_size: int = 16
    max_model_len: int = 0
    prefill_tokens_total: int = 0
    kv_bytes_sent_total: int = 0
    kv_bytes_received_total: int = 0
    prefix_hit_tokens_total: int = 0


class _FakeWorker:
    role = ""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.fields = StatusFields()
        self.status_calls = 0
        self.status_delay = 0.0
        self.events: list[tuple[str, int]] = []  # ("stored" | "removed", hash), event i has seq i + 1
        self.aborts: list[str] = []
        self.pinned: list[tuple[int, ...]] = []  # PinPrefix calls' prefixes (unpinned ones removed)
        self.pin_calls = 0
        self.pin_failure: grpc.StatusCode | None = None  # PinPrefix fails with this code
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self._port = 0

    async def start(self, port: int | None = None) -> str:
        """Serve on 127.0.0.1 (the same port as before when restarting)."""
        server = grpc.aio.server()
        self._add_to(server)
        self._port = server.add_insecure_port(f"127.0.0.1:{port if port is not None else self._port}")
        await server.start()
        self._server = server
        self.address = f"127.0.0.1:{self._port}"
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    def _add_to(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    def status_message(self, after_event: int) -> epd_pb2.WorkerStatus:
        f = self.fields
        message = epd_pb2.WorkerStatus(
            role=self.role, id=self.worker_id, address=self.address, kv_pages_total=f.kv_pages_total,
            kv_pages_free=f.kv_pages_free, running=f.running, waiting=f.waiting,
            queued_prefill_tokens=f.queued_prefill_tokens, page_size=f.page_size, max_model_len=f.max_model_len,
            prefill_tokens_total=f.prefill_tokens_total, kv_bytes_sent_total=f.kv_bytes_sent_total,
            kv_bytes_received_total=f.kv_bytes_received_total, prefix_hit_tokens_total=f.prefix_hit_tokens_total,
            model="tiny", event_seq=len(self.events),
            pins=[page_hashes(list(p), f.page_size)[-1] for p in self.pinned if len(p) >= f.page_size])
        if after_event == 0:  # a snapshot: the hashes held now
            held: dict[int, None] = {}
            for kind, h in self.events:
                if kind == "stored":
                    held[h] = None
                else:
                    held.pop(h, None)
            message.events_reset = True
            message.stored.extend(held)
            return message
        for kind, h in self.events[after_event:]:
            (message.stored if kind == "stored" else message.removed).append(h)
        return message

    async def Status(self, request: epd_pb2.StatusRequest, context: grpc.aio.ServicerContext) -> epd_pb2.WorkerStatus:
        self.status_calls += 1
        if self.status_delay:
            await asyncio.sleep(self.status_delay)
        return self.status_message(request.after_event)

    async def Abort(self, request: epd_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> epd_pb2.AbortResponse:
        self.aborts.append(request.request_id)
        return epd_pb2.AbortResponse(found=True)

    async def PinPrefix(self, request: epd_pb2.PinPrefixRequest,
                        context: grpc.aio.ServicerContext) -> epd_pb2.PinPrefixResponse:
        self.pin_calls += 1
        if self.pin_failure is not None:
            await context.abort(self.pin_failure, "fake pin refusal: over the cap")
        prefix = tuple(request.token_ids)
        added = 0 if prefix in self.pinned else len(prefix) // self.fields.page_size
        if prefix not in self.pinned:
            self.pinned.append(prefix)
        return epd_pb2.PinPrefixResponse(pages_added=added, pinned_pages=sum(len(p) // 16 for p in self.pinned))

    async def UnpinPrefix(self, request: epd_pb2.PinPrefixRequest,
                          context: grpc.aio.ServicerContext) -> epd_pb2.PinPrefixResponse:
        prefix = tuple(request.token_ids)
        found = prefix in self.pinned
        if found:
            self.pinned.remove(prefix)
        return epd_pb2.PinPrefixResponse(found=found)


class FakeDecodeWorker(_FakeWorker, epd_pb2_grpc.DecodeWorkerServicer):
    role = "decode"

    def __init__(self, worker_id: str, behaviour: DecodeBehaviour) -> None:
        super().__init__(worker_id)
        self.behaviour = behaviour
        self.requests: list[epd_pb2.DecodeRequest] = []
        self.cancelled: dict[str, float] = {}  # request id -> monotonic time the stream was cancelled
        self.completed: list[str] = []
        self.closed_sessions: list[str] = []
        self.on_request: Callable[[epd_pb2.DecodeRequest], None] | None = None
        self.multiplex = True  # serves DecodeWorker.Stream
        self.streams_opened = 0

    def _add_to(self, server: grpc.aio.Server) -> None:
        epd_pb2_grpc.add_DecodeWorkerServicer_to_server(self, server)

    async def Stream(self, requests, context: grpc.aio.ServicerContext) -> None:  # noqa: ANN001
        """The multiplexed form, by the decode worker's own code around this Generate;
        refused as an older worker would (UNIMPLEMENTED) unless `multiplex`."""
        self.streams_opened += 1
        if not self.multiplex:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        await serve_stream(self, requests, context)

    async def CloseSession(self, request: epd_pb2.CloseSessionRequest,
                           context: grpc.aio.ServicerContext) -> epd_pb2.CloseSessionResponse:
        self.closed_sessions.append(request.session_id)
        return epd_pb2.CloseSessionResponse(found=any(r.session_id == request.session_id for r in self.requests))

    def tokens_for(self, request: epd_pb2.DecodeRequest) -> list[int]:
        """The whole output the script gives this prompt, less what a migrated request
        already streamed (its `resume_token_ids`, the output's first tokens)."""
        return self.full_output(request)[len(request.resume_token_ids):]

    def full_output(self, request: epd_pb2.DecodeRequest) -> list[int]:
        b = self.behaviour
        count = request.sampling.max_tokens
        if b.token_limit is not None:
            count = min(count, b.token_limit)
        if b.eos_at is not None:
            count = min(count, b.eos_at + 1)
        tokens = [b.script[i % len(b.script)] for i in range(count)]
        if b.eos_at is not None and count == b.eos_at + 1:
            tokens[-1] = b.eos_id
        return tokens

    async def Generate(self, request: epd_pb2.DecodeRequest, context: grpc.aio.ServicerContext):  # noqa: ANN201
        self.requests.append(request)
        b = self.behaviour
        try:
            if b.first_token_delay:
                await asyncio.sleep(b.first_token_delay)
            if b.fail_before_first is not None:
                await context.abort(b.fail_before_first, "fake decode failure")
            tokens = self.tokens_for(request)
            sent = 0
            for start in range(0, len(tokens), b.chunk_size):
                if b.fail_after is not None and sent >= b.fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake decode died")
                if b.token_delay:
                    await asyncio.sleep(b.token_delay)
                ids = tokens[start:start + b.chunk_size]
                message = epd_pb2.DecodeResponse(chunk=epd_pb2.TokenChunk(token_ids=ids, logprobs=_logprobs(request, ids)))
                if not sent and b.prefill_failure is not None:
                    message.prefill_attempts.extend(_attempts(request, b.prefill_failure, b.failing_prefill))
                sent += len(ids)
                yield message
            yield epd_pb2.DecodeResponse(finished=self._finished(request, self.full_output(request)))
            self.completed.append(request.request_id)
        except asyncio.CancelledError:
            self.cancelled[request.request_id] = time.monotonic()
            raise

    def _finished(self, request: epd_pb2.DecodeRequest, tokens: list[int]) -> epd_pb2.Finished:
        b = self.behaviour
        usage = epd_pb2.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(tokens),
                              cached_tokens=b.cached_tokens)
        if b.finish_error is not None:
            return epd_pb2.Finished(reason=epd_pb2.FINISH_REASON_ERROR, error=b.finish_error, usage=usage)
        if b.eos_at is not None and tokens and tokens[-1] == b.eos_id and len(tokens) == b.eos_at + 1:
            return epd_pb2.Finished(reason=epd_pb2.FINISH_REASON_STOP, stop_token=b.eos_id, usage=usage)
        return epd_pb2.Finished(reason=epd_pb2.FINISH_REASON_LENGTH, usage=usage)


def _attempts(request: epd_pb2.DecodeRequest, code: str, failing: str) -> list[epd_pb2.PrefillAttempt]:
    attempts = []
    for candidate in request.prefill:
        ok = candidate.id != failing
        attempts.append(epd_pb2.PrefillAttempt(id=candidate.id, address=candidate.address, ok=ok,
                                               code="" if ok else code))
        if ok:
            break
    return attempts


def _logprobs(request: epd_pb2.DecodeRequest, ids: list[int]) -> list[epd_pb2.TokenLogprob]:
    if not request.sampling.HasField("logprobs"):
        return []
    k = request.sampling.logprobs
    return [epd_pb2.TokenLogprob(token_id=t, logprob=-0.25,
                                 top=[epd_pb2.TopLogprob(token_id=t + i, logprob=-0.25 - i) for i in range(k)])
            for t in ids]


class FakePrefillWorker(_FakeWorker, epd_pb2_grpc.PrefillWorkerServicer):
    role = "prefill"

    def _add_to(self, server: grpc.aio.Server) -> None:
        epd_pb2_grpc.add_PrefillWorkerServicer_to_server(self, server)

    def store(self, hashes: list[int]) -> None:
        self.events.extend(("stored", h) for h in hashes)

    def evict(self, hashes: list[int]) -> None:
        self.events.extend(("removed", h) for h in hashes)

    async def Prefill(self, request: epd_pb2.PrefillRequest, context: grpc.aio.ServicerContext) -> epd_pb2.PrefillResponse:
        return epd_pb2.PrefillResponse(first_token=1)


class FakeEncodeWorker(_FakeWorker, epd_pb2_grpc.EncodeWorkerServicer):
    """Answers Status only (the router never calls Encode: prefill does)."""

    role = "encode"

    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id)
        self.queued_images = 0

    def _add_to(self, server: grpc.aio.Server) -> None:
        epd_pb2_grpc.add_EncodeWorkerServicer_to_server(self, server)

    def status_message(self, after_event: int) -> epd_pb2.WorkerStatus:
        message = super().status_message(after_event)
        message.queued_images = self.queued_images
        return message
