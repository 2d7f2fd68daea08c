"""The decode worker: owns a request once routed.

Flow (DESIGN.md): match the local prefix cache; if the uncached part is short, prefill
here. Otherwise reserve pages for the prompt, ask prefill workers in turn to compute it
and push its KV into those pages; the first that succeeds gives the first token and
decoding continues here. If every prefill worker fails, prefill locally. Cancelling the
stream (client gone) aborts the request here and cancels the prefill call.

A request migrated from a failed decode worker (`resume_token_ids`) goes the same way
with prompt + the tokens it already streamed: their KV is computed here or by a prefill
worker, and only the tokens after them are sent.

A turn of a session (`session_id`) starts from the KV the session's last turn left here
(engine/sessions.py): only the tokens after it count as uncached, so a short follow-up
is prefilled here and a long one reserves (and receives) only its new pages.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import grpc

from decode_worker.mux import serve_stream
from decode_worker.prefill_stats import RemotePrefillStats
from decode_worker.remote_prefill import RemotePrefiller
from engine.engine import RemoteReservation, StepOutput
from engine.errors import InvalidRequestError
from engine.multimodal import ImageInput, check_images
from engine.sampling_params import SamplingParams
from engine.sessions import check_session_id
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto import tracing
from proto.convert import FINISH_REASONS, images_from_proto, logprob_to_proto, params_from_proto
from worker.config import WorkerConfig
from worker.pins import check_pin_count
from worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)
RESERVE_RETRY_S = 0.01


class DecodeService(pb_grpc.DecodeWorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.engine = runtime.engine
        self.prefill_stats = RemotePrefillStats()
        self.prefiller = RemotePrefiller(runtime, self.prefill_stats)
        runtime.metric_sources.append(self.prefill_stats.samples)
        runtime.closers.append(self.prefiller.close)

    async def Generate(self, request: pb.DecodeRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecodeResponse]:
        async for response in self.generate(request, context):
            yield response

    async def generate(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext,
                       emit: Callable[[], pb.DecodeResponse] | None = None) -> AsyncIterator[pb.DecodeResponse]:
        """Generate's messages, yielded; or, with `emit` (the stream's requests,
        decode_worker/mux.py: it returns a new, empty response in the stream's outbox),
        the token messages written into what `emit` returns, from the engine loop as
        each step's outputs are published, so no task wakes per token (what is yielded
        then is only a migrated request's finish). Returns when the request ends."""
        span = tracing.start("decode.generate", context.invocation_metadata(), "server", request_id=request.request_id,
                             worker=self.runtime.worker_id, prompt_tokens=len(request.prompt_token_ids))
        try:
            async with self.runtime.life.gate.admit(context):
                async for response in self._generate(request, context, span, emit):
                    yield response
        finally:
            span.end()

    async def Stream(self, requests: AsyncIterator[pb.DecodeStreamRequest], context: grpc.aio.ServicerContext) -> None:
        """Generate for many requests over one stream (decode_worker/mux.py)."""
        await serve_stream(self, requests, context)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        return await self.runtime.life.drain_call(request)

    async def _generate(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext,
                        span: tracing.TraceSpan,
                        emit: Callable[[], pb.DecodeResponse] | None) -> AsyncIterator[pb.DecodeResponse]:
        rid, prompt, resumed = request.request_id, list(request.prompt_token_ids), list(request.resume_token_ids)
        async_engine = self.runtime.async_engine
        try:
            params = params_from_proto(request.sampling)
            images = images_from_proto(request.images)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if async_engine.subscribed(rid):  # (a second call must not take over the live one's stream)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request id {rid!r} is already in use")
        # A request that can only prefill here is checked and queued in one hop to the engine
        # thread: under load each hop waits for the step in flight, so every hop saved is a
        # step off this request's time to first token.
        local = not (request.prefill and self.runtime.transfer is not None) and not request.pin_prefix_tokens
        queue = async_engine.subscribe(rid) if rid else None
        finished = False
        try:
            try:
                done = await async_engine.run(self._admit, request, prompt, params, images, resumed, local)
            except InvalidRequestError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if done is not None:
                yield pb.DecodeResponse(finished=_finished(done))
                return
            attempts: list[pb.PrefillAttempt] = []
            if local:
                span.event("local_prefill")
            else:
                try:
                    attempts = await self._start(request, prompt, params, images, resumed, span)
                except InvalidRequestError as exc:  # e.g. an image the local vision tower cannot decode
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            assert queue is not None  # _admit refused an empty id
            if emit is not None:
                await self._forward(rid, queue, attempts, emit)
                finished = True
                return
            async for out in async_engine.stream_merged(queue):
                messages = _responses(out)
                if attempts and messages:  # the request's first message says how prefill went
                    messages[0].prefill_attempts.extend(attempts)
                    attempts = []
                for message in messages:
                    yield message
                finished = out.finished
        finally:
            if queue is not None:
                await async_engine.finish_stream(rid, finished)

    async def _forward(self, rid: str, queue: asyncio.Queue[StepOutput], attempts: list[pb.PrefillAttempt],
                       emit: Callable[[], pb.DecodeResponse]) -> None:
        """Write the request's outputs, as they are published, into the response slots
        `emit` hands out (filled in place: no message built and then copied); return
        once the last one is out (a cancel of the caller's task lands here)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def forward(out: StepOutput) -> None:
            nonlocal attempts
            if done.done():
                return
            try:
                first = None
                if out.new_token_ids:
                    first = emit()
                    _fill_chunk(first.chunk, out)
                if out.finished:
                    last = emit()
                    last.finished.CopyFrom(_finished(out))
                    first = first or last
                if attempts and first is not None:  # the request's first message says how prefill went
                    first.prefill_attempts.extend(attempts)
                    attempts = []
            except Exception as exc:  # noqa: BLE001 - this request fails; publish goes on for the others
                done.set_exception(exc)
                return
            if out.finished:
                done.set_result(None)

        if not self.runtime.async_engine.redirect(rid, queue, forward):
            raise RuntimeError(f"request {rid} lost its subscription")
        await done

    def _admit(self, request: pb.DecodeRequest, prompt: list[int], params: SamplingParams,
               images: list[ImageInput], resumed: list[int], local: bool) -> StepOutput | None:
        """On the engine thread: every check of the request; then the finish a migrated
        request's output already reached (nothing queued), or, when `local`, the request
        queued for a prefill here. InvalidRequestError names what is wrong."""
        engine = self.engine
        engine.validate(prompt, params)
        if not request.request_id:
            raise InvalidRequestError("request_id is required")
        if request.session_id:
            check_session_id(request.session_id)
        check_pin_count(request.pin_prefix_tokens, len(prompt))
        info = engine.multimodal
        check_images(prompt, images, info.image_token_id if info else None)
        # A migrated request whose streamed output already ends it: only the finish.
        done = engine.resumed_finish(request.request_id, prompt, params, resumed)
        if done is not None:
            return done
        engine.validate_resume(prompt, params, resumed)
        if local:
            engine.add_request(prompt, params, request.request_id, images=images, output_token_ids=resumed,
                               session_id=request.session_id)
        return None

    async def _start(self, request: pb.DecodeRequest, prompt: list[int], params: SamplingParams,
                     images: list[ImageInput], resumed: list[int], span: tracing.TraceSpan) -> list[pb.PrefillAttempt]:
        """A request that may prefill remotely (checked by `_admit`, not yet queued).
        Images: their bytes stay in `images` for a local prefill (or a recompute after
        preemption); KV of image tokens from a prefill worker needs no embeddings.
        `resumed`: a migrated request's output so far, computed with the prompt.
        Returns the remote prefill attempts made."""
        rid, session = request.request_id, request.session_id
        run = self.runtime.async_engine.run
        attempts: list[pb.PrefillAttempt] = []
        if request.pin_prefix_tokens:  # (no engine-thread hop for the usual request)
            await run(self.runtime.pins.apply, prompt, request.pin_prefix_tokens, rid)
        if await self._prefill_remotely(request, prompt, images, resumed):
            reservation = await self._reserve(prompt, params, rid, images, resumed, session)
            outcome = await self.prefiller.run(request, reservation, span)
            attempts = outcome.attempts
            if outcome.first is not None:
                out = await run(self.engine.resume_remote, rid, *outcome.first)
                self.runtime.async_engine.publish([out])
                return attempts
            await run(self.engine.abort_request, rid)  # every prefill failed: do it here
        span.event("local_prefill")
        await run(self.engine.add_request, prompt, params, rid, images=images, output_token_ids=resumed,
                  session_id=session)
        return attempts

    async def _prefill_remotely(self, request: pb.DecodeRequest, prompt: list[int],
                                images: list[ImageInput], resumed: list[int]) -> bool:
        """Remote when the uncached part is long, or holds an image (image work belongs to
        the encode and prefill pools, not to decode)."""
        if not request.prefill or self.runtime.transfer is None:
            return False
        if request.force_remote_prefill:
            return True
        tokens = prompt + resumed
        cached = await self.runtime.async_engine.run(self.engine.cached_prefix_tokens, tokens, images,
                                                     request.session_id)
        if any(image.end > cached for image in images):
            return True
        return len(tokens) - cached >= self.runtime.config.local_prefill_threshold

    async def _reserve(self, prompt: list[int], params: SamplingParams, rid: str,
                       images: list[ImageInput], resumed: list[int], session: str) -> RemoteReservation:
        """Wait (bounded) until the pool has pages for the whole prompt."""
        deadline = asyncio.get_running_loop().time() + self.runtime.config.prefill_timeout_s
        while True:
            # The images keep their bytes: should this request be preempted and its image
            # pages evicted, the recompute encodes them here.
            reservation = await self.runtime.async_engine.run(
                self.engine.reserve_remote, prompt, params, rid, images, resumed, session)
            if reservation is not None:
                return reservation
            if asyncio.get_running_loop().time() > deadline:
                raise InvalidRequestError("timed out waiting for free KV pages")
            await asyncio.sleep(RESERVE_RETRY_S)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        found = await self.runtime.async_engine.run(self.engine.abort_request, request.request_id)
        logger.info("Abort %s from the router: %s", request.request_id, "aborted" if found else "not running")
        if found:
            self.runtime.async_engine.publish([StepOutput(request.request_id, [], [], True, "abort", None)])
        return pb.AbortResponse(found=found)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStatus:
        return await self.runtime.status(request)

    async def FlushCache(self, request: pb.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> pb.FlushCacheResponse:
        return pb.FlushCacheResponse(pages_freed=await self.runtime.async_engine.run(self.engine.free_cache))

    async def CloseSession(self, request: pb.CloseSessionRequest,
                           context: grpc.aio.ServicerContext) -> pb.CloseSessionResponse:
        try:
            check_session_id(request.session_id)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        found = await self.runtime.async_engine.run(self.engine.close_session, request.session_id)
        return pb.CloseSessionResponse(found=found)

    async def PinPrefix(self, request: pb.PinPrefixRequest, context: grpc.aio.ServicerContext) -> pb.PinPrefixResponse:
        return await self.runtime.pins.pin(request, context)

    async def UnpinPrefix(self, request: pb.PinPrefixRequest,
                          context: grpc.aio.ServicerContext) -> pb.PinPrefixResponse:
        return await self.runtime.pins.unpin(request, context)


def _responses(out: StepOutput) -> list[pb.DecodeResponse]:
    """A step's tokens as a chunk, then (when it ended the request) the finish."""
    messages = [pb.DecodeResponse(chunk=_chunk(out))] if out.new_token_ids else []
    if out.finished:
        messages.append(pb.DecodeResponse(finished=_finished(out)))
    return messages


def _finished(out: StepOutput) -> pb.Finished:
    finished = pb.Finished(reason=FINISH_REASONS.get(out.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED))
    request = out.request
    if request is None:
        return finished
    finished.usage.CopyFrom(pb.Usage(prompt_tokens=request.num_prompt_tokens,
                                     completion_tokens=len(request.output_token_ids),
                                     cached_tokens=request.num_cached_tokens))
    if isinstance(request.stop_reason, str):
        if out.finish_reason == "error":
            finished.error = request.stop_reason
        else:
            finished.stop_string = request.stop_reason
    elif isinstance(request.stop_reason, int):
        finished.stop_token = request.stop_reason
    return finished


def _chunk(out: StepOutput) -> pb.TokenChunk:
    return pb.TokenChunk(token_ids=out.new_token_ids, logprobs=[logprob_to_proto(lp) for lp in out.new_logprobs])


def _fill_chunk(chunk: pb.TokenChunk, out: StepOutput) -> None:
    """`_chunk`'s content, written into an existing (empty) chunk."""
    chunk.token_ids.extend(out.new_token_ids)
    if out.new_logprobs:
        chunk.logprobs.extend([logprob_to_proto(lp) for lp in out.new_logprobs])


async def serve_decode(config: WorkerConfig) -> WorkerRuntime:
    runtime = WorkerRuntime(config)
    pb_grpc.add_DecodeWorkerServicer_to_server(DecodeService(runtime), runtime.server)
    await runtime.start()
    return runtime
