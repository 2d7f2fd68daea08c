"""Decode's remote prefill: prefill workers, tried in the router's order, compute a
prompt (and a migrated request's output so far) into pages reserved here.

Every attempt is bounded twice: the Prefill call by `--prefill-timeout`, and the KV's
progress by `--transfer-timeout`: its first chunk must land within that time of the
call (`--prefill-start-timeout` when set: a busy prefill worker's queue wait counts
here; for a prompt with images, the prefill timeout: the encoders' own timeouts bound
those) and each later chunk within the transfer timeout of the one before. A prefill worker
that stalls (stops sending, or its peer path freezes) is thus given up on after one
transfer timeout, however long the prompt, and the next candidate is tried. Each
attempt's outcome is reported back to the router (its circuit breakers count them).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass, field

import grpc

from decode_worker.prefill_stats import RemotePrefillStats
from engine.engine import RemoteReservation
from engine.request import TokenLogprob
from kv_transfer import TransferError, TransferTimeoutError
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto import tracing
from proto.auth import cluster_channel
from proto.convert import logprob_from_proto
from worker.config import GRPC_MESSAGE_OPTIONS
from worker.kv_layout import KV_REGION, KVTarget, targets
from worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)
FirstToken = tuple[int, TokenLogprob | None]


@dataclass
class PrefillOutcome:
    """The first token from the candidate that succeeded (None: every one failed) and
    every attempt made, in order."""

    first: FirstToken | None
    attempts: list[pb.PrefillAttempt] = field(default_factory=list)


class RemotePrefiller:
    def __init__(self, runtime: WorkerRuntime, stats: RemotePrefillStats) -> None:
        self.runtime = runtime
        self.stats = stats
        self._generations = itertools.count(1)
        self.tp_size = runtime.engine.config.tensor_parallel_size
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def run(self, request: pb.DecodeRequest, reservation: RemoteReservation,
                  span: tracing.TraceSpan = tracing.NO_SPAN) -> PrefillOutcome:
        outcome = PrefillOutcome(None)
        for candidate in request.prefill:
            started = time.perf_counter()
            attempt = tracing.start("decode.remote_prefill", span, "client", prefill=candidate.address,
                                    pages=len(reservation.page_ids))
            try:
                with self.stats.attempt(candidate.address, after_failure=bool(outcome.attempts)):
                    first, report = await self._attempt(candidate, request, reservation, attempt)
                if first is None:
                    attempt.fail(f"{report.code}: {report.error}")
            finally:
                attempt.end()
            outcome.attempts.append(report)
            if first is not None:
                self.stats.durations.observe(time.perf_counter() - started)
                outcome.first = first
                return outcome
            self.stats.failures.add(candidate.address)
        self.stats.local_fallbacks_total += 1
        return outcome

    async def _attempt(self, candidate: pb.PrefillCandidate, request: pb.DecodeRequest,
                       reservation: RemoteReservation,
                       span: tracing.TraceSpan) -> tuple[FirstToken | None, pb.PrefillAttempt]:
        """One prefill worker computes the prompt into our pages."""
        generation = next(self._generations)
        room = f"{request.request_id}#{generation}"
        transfer = self.runtime.transfer
        assert transfer is not None
        rooms = self._reserve(room, generation, reservation.page_ids)
        report = pb.PrefillAttempt(id=candidate.id, address=candidate.address)
        call = asyncio.ensure_future(self._call(candidate, request, reservation, room, generation, span))
        try:
            response = await self._landed(rooms, call, self._first_chunk_timeout(request))
            span.event("kv_landed")
            logprob = logprob_from_proto(response.logprob) if response.HasField("logprob") else None
            report.ok = True
            return (response.first_token, logprob), report
        except (grpc.aio.AioRpcError, TransferError, asyncio.TimeoutError) as exc:
            report.code, report.error = _code(exc), _details(exc)
            logger.warning("prefill on %s failed for %s: %s: %s", candidate.address, request.request_id,
                           report.code, report.error)
            return None, report
        finally:
            call.cancel()  # a no-op once it returned; else the prefill worker aborts it
            await asyncio.gather(call, return_exceptions=True)
            for target in rooms:
                transfer.release_room(target.room_id)  # late writes of this generation are fenced off

    def _reserve(self, room: str, generation: int, page_ids: list[int]) -> list[KVTarget]:
        """One room per tensor-parallel rank of this worker over the same pages (the room
        itself, in region "kv", at size 1)."""
        transfer = self.runtime.transfer
        assert transfer is not None
        rooms = targets(room, self.tp_size)
        try:
            for target in rooms:
                transfer.reserve_room(target.room_id, generation, target.region, page_ids)
        except BaseException:
            for target in rooms:
                transfer.release_room(target.room_id)
            raise
        return rooms

    def _first_chunk_timeout(self, request: pb.DecodeRequest) -> float:
        config = self.runtime.config
        if request.images:
            return config.prefill_timeout_s
        return config.prefill_start_timeout_s or config.transfer_timeout_s

    async def _landed(self, rooms: list[KVTarget], call: asyncio.Future[pb.PrefillResponse],
                      first_timeout: float) -> pb.PrefillResponse:
        """Wait for the final chunk of every rank's room (each chunk within its progress
        timeout), failing as soon as the call does; then the call's answer, which follows
        the final chunk. Rank 0's room is followed as it fills; the sender writes the
        other ranks' chunks alongside, so theirs are in by then or just behind."""
        for index, target in enumerate(rooms):
            await self._room_landed(target.room_id, call,
                                    first_timeout if index == 0 else self.runtime.config.transfer_timeout_s)
        async with asyncio.timeout(self.runtime.config.transfer_timeout_s):
            return await asyncio.shield(call)

    async def _room_landed(self, room: str, call: asyncio.Future[pb.PrefillResponse], first_timeout: float) -> None:
        transfer, timeout = self.runtime.transfer, first_timeout
        assert transfer is not None
        while True:
            note = asyncio.ensure_future(transfer.wait_notification(room, timeout=timeout))
            try:
                await asyncio.wait({note, call}, return_when=asyncio.FIRST_COMPLETED)
                if call.done() and not note.done() and call.exception() is not None:
                    call.result()  # the RPC failed: raise its error now
                if (await note).final:
                    break
            finally:
                note.cancel()
            timeout = self.runtime.config.transfer_timeout_s

    async def _call(self, candidate: pb.PrefillCandidate, request: pb.DecodeRequest,
                    reservation: RemoteReservation, room: str, generation: int,
                    span: tracing.TraceSpan) -> pb.PrefillResponse:
        transfer = self.runtime.transfer
        assert transfer is not None
        destination = pb.KVDestination(
            endpoint_json=json.dumps(transfer.descriptor().to_dict()), room_id=room, generation=generation,
            start_page=reservation.start_page, page_ids=reservation.page_ids, region=KV_REGION)
        if self.tp_size > 1:
            destination.tp_size = self.tp_size
        stub = pb_grpc.PrefillWorkerStub(self._channel(candidate.address))
        return await stub.Prefill(pb.PrefillRequest(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            sampling=request.sampling, destination=destination, images=request.images,
            output_token_ids=request.resume_token_ids, pin_prefix_tokens=request.pin_prefix_tokens),
            timeout=self.runtime.config.prefill_timeout_s,
            metadata=span.metadata())

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = cluster_channel(address, GRPC_MESSAGE_OPTIONS, self.runtime.config.cluster_token)
        return self._channels[address]

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)


def _code(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, (TransferTimeoutError, asyncio.TimeoutError)):
        return "TIMEOUT"
    return "TRANSFER"


def _details(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.details() or ""
    return str(exc) or type(exc).__name__
