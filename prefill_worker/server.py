"""The prefill worker: computes prompts in chunks and pushes each chunk's KV pages into
the decode worker's reserved pages as soon as it is computed.

Pages are shipped from the engine's after-step hook, which runs before the next step:
no page being read can be rewritten meanwhile. A finished prefill keeps its pages
(`hold_pages`) until its last chunk has landed, then they go to the radix cache.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from dataclasses import dataclass, field

import grpc

from engine.engine import StepOutput
from engine.errors import InvalidRequestError
from engine.multimodal import ImageInput, check_images
from engine.sampling_params import SamplingParams
from kv_transfer import EndpointDescriptor, Notification, PageRun, PeerHandle, TransferError, coalesce
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto import tracing
from prefill_worker.ship_stats import ShipStats
from prefill_worker.images import ImageFetcher
from prefill_worker.kv_fanout import Fanout, FanoutPlanner
from proto.convert import images_from_proto, logprob_to_proto, params_from_proto
from worker.config import WorkerConfig
from worker.pins import check_pin_count
from worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)


@dataclass
class ShipJob:
    """KV still to push for one request. Token page i goes to dst.page_ids[i - start]."""

    request_id: str
    prompt_len: int
    destination: pb.KVDestination
    peer: PeerHandle
    next_page: int
    fanout: Fanout  # the receiving ranks (one at TP size 1) and the stage pages pass through
    seq: int = 0
    done: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    bytes_sent: int = 0

    def __post_init__(self) -> None:
        # A call that went away leaves `done` unread; its error is already handled.
        self.done.add_done_callback(lambda fut: fut.cancelled() or fut.exception())


@dataclass(frozen=True)
class Work:
    """What one Prefill call computes: the prompt, a migrated request's output so far
    (empty otherwise), the request's sampling parameters and its images."""

    prompt: list[int]
    outputs: list[int]
    params: SamplingParams
    images: list[ImageInput]


def _first_only(params: SamplingParams, outputs: list[int]) -> SamplingParams:
    """Prefill samples exactly the next token (output number len(outputs)); decode
    applies every stop rule to it."""
    return dataclasses.replace(params, max_tokens=len(outputs) + 1, ignore_eos=True, stop=())


class PrefillService(pb_grpc.PrefillWorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.engine = runtime.engine
        self.jobs: dict[str, ShipJob] = {}
        self.page_size = self.engine.config.page_size
        assert runtime.transfer is not None  # WorkerRuntime refuses a prefill worker without one
        self.fanouts = FanoutPlanner(self.engine, runtime.transfer)
        self.ship_stats = ShipStats()
        runtime.metric_sources.append(self.ship_stats.samples)
        runtime.set_step_hook(self._ship)
        # Vision-language models: embeddings from the encode pool (or encoded here).
        self.images: ImageFetcher | None = None
        if self.engine.multimodal is not None:
            self.images = ImageFetcher(self.engine, runtime.config)
            runtime.status_sources.append(self._image_counts)
            runtime.starters.append(self.images.start)
            runtime.closers.append(self.images.close)

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        span = tracing.start("prefill.prefill", context.invocation_metadata(), "server", request_id=request.request_id,
                             worker=self.runtime.worker_id, prompt_tokens=len(request.prompt_token_ids),
                             images=len(request.images))
        try:
            async with self.runtime.life.gate.admit(context):
                return await self._prefill(request, context, span)
        except BaseException as exc:
            span.fail(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            span.end()

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        return await self.runtime.life.drain_call(request)

    async def _prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext,
                       span: tracing.TraceSpan) -> pb.PrefillResponse:
        rid = request.request_id
        outputs = list(request.output_token_ids)  # a migrated request's output so far
        try:
            params = params_from_proto(request.sampling)
            prompt = list(request.prompt_token_ids)
            await self.runtime.async_engine.run(self.engine.validate, prompt, params)
            await self.runtime.async_engine.run(self.engine.validate_resume, prompt,
                                                _first_only(params, outputs), outputs)
            self._check_destination(request.destination, len(prompt) + len(outputs))
            check_pin_count(request.pin_prefix_tokens, len(prompt))
            images = images_from_proto(request.images)
            info = self.engine.multimodal
            check_images(prompt, images, info.image_token_id if info else None)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        dst = request.destination
        try:
            peer = await self._connect(dst)
            fanout = await self.fanouts.plan(dst.room_id, dst.region, dst.tp_size, peer.descriptor)
        except (TransferError, InvalidRequestError) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot reach KV destination: {exc}")
        job = ShipJob(rid, len(prompt) + len(outputs), dst, peer, dst.start_page, fanout)
        if request.pin_prefix_tokens:
            await self.runtime.async_engine.run(self.runtime.pins.apply, prompt, request.pin_prefix_tokens, rid)
        if images and self.images is not None:
            images = await self.images.fetch(rid, list(request.images), images, span)
        self.ship_stats.seen(peer.descriptor.address)
        with self.ship_stats.jobs.held(peer.descriptor.address):
            return await self._serve(job, Work(prompt, outputs, params, images), context)

    def _image_counts(self) -> dict[str, int]:
        assert self.images is not None
        return dict(self.images.counts(), images_encoded_total=self.engine.counters.images_encoded_total)

    async def _serve(self, job: ShipJob, work: Work, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        """Run the job; however it ends, its pages are given back before this returns."""
        destination = job.peer.descriptor.address
        outcome = self.ship_stats.failed
        try:
            response = await self._run(job, work)
            outcome = self.ship_stats.delivered
            return response
        except InvalidRequestError as exc:  # e.g. an image the vision tower here cannot decode
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncio.CancelledError:  # the decode worker hung up (or died)
            outcome = self.ship_stats.cancelled
            raise
        except TransferError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {exc}")
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "prefill or its KV transfer did not finish in time")
        finally:
            self.jobs.pop(job.request_id, None)
            # Shielded: a second cancellation must not skip the release of held pages.
            await asyncio.shield(self.runtime.async_engine.run(self._drop, job.request_id))
            outcome.add(destination)
            if outcome is not self.ship_stats.delivered:
                logger.info("prefill %s for %s ended undelivered (%s); its pages are released",
                            job.request_id, destination, outcome.name)

    async def _run(self, job: ShipJob, work: Work) -> pb.PrefillResponse:
        async_engine = self.runtime.async_engine
        queue = async_engine.subscribe(job.request_id)
        self.jobs[job.request_id] = job
        try:
            await async_engine.run(self.engine.add_request, work.prompt, _first_only(work.params, work.outputs),
                                   job.request_id, hold_pages=True, images=work.images,
                                   output_token_ids=work.outputs)
            first = await self._first_output(job, queue)
            if first.finish_reason == "abort":
                raise TransferError("prefill aborted")
            if first.finish_reason == "error":
                raise TransferError(f"prefill failed: {first.request.stop_reason}")
            # Shielded: `done` belongs to the shipping side, which may still resolve it.
            # asyncio.timeout, not wait_for, which can swallow a cancellation (3.11).
            async with asyncio.timeout(self.runtime.config.transfer_timeout_s):
                kv_bytes = await asyncio.shield(job.done)
        finally:
            async_engine.unsubscribe(job.request_id)
        response = pb.PrefillResponse(first_token=first.new_token_ids[0],
                                      cached_tokens=first.request.num_cached_tokens, kv_bytes=kv_bytes)
        if first.new_logprobs:
            response.logprob.CopyFrom(logprob_to_proto(first.new_logprobs[0]))
        return response

    async def _first_output(self, job: ShipJob, queue: asyncio.Queue[StepOutput]) -> StepOutput:
        """The prefill's first token, or the error of a chunk that could not be shipped
        meanwhile: a dead or fenced destination ends the prefill now, not after the rest
        of the prompt was computed for nobody."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.runtime.config.prefill_timeout_s
        output = asyncio.ensure_future(queue.get())
        try:
            await asyncio.wait({output, job.done}, timeout=self.runtime.config.prefill_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
            if not output.done() and job.done.done() and not job.done.cancelled():
                job.done.result()  # raises the shipping error
            # (`done` succeeds only with the final chunk, sent after the first token was published.)
            async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                return await asyncio.shield(output)
        finally:
            output.cancel()

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        job = self.jobs.pop(request.request_id, None)
        if job is not None:
            # Wake the waiting Prefill call: it fails with "aborted" and drops the request.
            self.runtime.async_engine.publish([StepOutput(request.request_id, [], [], True, "abort", None)])
        found = await self.runtime.async_engine.run(self.engine.abort_request, request.request_id)
        return pb.AbortResponse(found=bool(found or job))

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStatus:
        return await self.runtime.status(request)

    async def FlushCache(self, request: pb.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> pb.FlushCacheResponse:
        return pb.FlushCacheResponse(pages_freed=await self.runtime.async_engine.run(self.engine.free_cache))

    async def PinPrefix(self, request: pb.PinPrefixRequest, context: grpc.aio.ServicerContext) -> pb.PinPrefixResponse:
        return await self.runtime.pins.pin(request, context)

    async def UnpinPrefix(self, request: pb.PinPrefixRequest,
                          context: grpc.aio.ServicerContext) -> pb.PinPrefixResponse:
        return await self.runtime.pins.unpin(request, context)

    def _drop(self, request_id: str) -> None:
        """Engine thread: give back held pages, or abort a prefill still running."""
        self.engine.release_held(request_id)
        self.engine.abort_request(request_id)

    def _check_destination(self, dst: pb.KVDestination, prompt_len: int) -> None:
        pages = -(-prompt_len // self.page_size)
        if not dst.endpoint_json or not dst.room_id:
            raise InvalidRequestError("destination needs endpoint_json and room_id")
        if dst.start_page + len(dst.page_ids) != pages:
            raise InvalidRequestError(
                f"destination has pages for token pages [{dst.start_page}, {dst.start_page + len(dst.page_ids)}); "
                f"the prompt has {pages}")

    async def _connect(self, dst: pb.KVDestination) -> PeerHandle:
        try:
            descriptor = EndpointDescriptor.from_dict(json.loads(dst.endpoint_json))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequestError(f"malformed destination endpoint: {exc}") from exc
        # The backend reuses a live connection to the same descriptor.
        return await self.runtime.transfer.connect(descriptor, timeout=self.runtime.config.transfer_timeout_s)

    # -- shipping (after each step, before the next) -----------------------------------

    async def _ship(self, outputs: list[StepOutput]) -> None:
        sends = [self._plan(job) for job in list(self.jobs.values())]
        await asyncio.gather(*(self._send(job, src, dst, final) for job, src, dst, final in filter(None, sends)))

    def _plan(self, job: ShipJob) -> tuple[ShipJob, list[int], list[int], bool] | None:
        """Pages computed since the last send; read synchronously, before any await."""
        if job.done.done():
            return None
        request = self.engine.requests.get(job.request_id) or self.engine.scheduler.parked.get(job.request_id)
        if request is None:
            return None
        final = request.finished
        limit = -(-job.prompt_len // self.page_size) if final else request.num_computed_tokens // self.page_size
        limit = min(limit, -(-job.prompt_len // self.page_size))
        if limit <= job.next_page and not final:
            return None
        start = job.destination.start_page
        src = request.pages[job.next_page:limit]
        dst = list(job.destination.page_ids[job.next_page - start:limit - start])
        job.next_page = max(job.next_page, limit)
        return job, src, dst, final

    async def _send(self, job: ShipJob, src: list[int], dst: list[int], final: bool) -> None:
        """Pages `src` here into pages `dst` of every receiving rank, straight from this
        worker's regions or through a stage (kv_fanout.py)."""
        try:
            stage = job.fanout.stage
            if stage is None:
                await self._write_round(job, coalesce(src, dst), final)
            else:
                async with stage.lock:
                    for start in range(0, max(len(src), 1), stage.slots):
                        pages = src[start:start + stage.slots]
                        if pages:
                            stage.fill(pages)
                        runs = coalesce(range(len(pages)), dst[start:start + stage.slots])
                        await self._write_round(job, runs, final and start + stage.slots >= len(src))
            if final and not job.done.done():  # the Prefill call may be gone (cancelled) already
                job.done.set_result(job.bytes_sent)
        except TransferError as exc:
            if not job.done.done():
                job.done.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - fail this request, never the engine loop
            logger.exception("shipping KV of %s failed", job.request_id)
            if not job.done.done():
                job.done.set_exception(TransferError(f"shipping KV failed: {exc!r}"))

    async def _write_round(self, job: ShipJob, runs: list[PageRun], final: bool) -> None:
        """One write per receiving rank, with the same runs and notification number."""
        dst, seq, timeout = job.destination, job.seq, self.runtime.config.transfer_timeout_s
        job.seq += 1
        writes = [self.runtime.transfer.write(
            job.peer, room_id=target.room_id, generation=dst.generation, region=target.region, runs=runs,
            notification=Notification(room_id=target.room_id, generation=dst.generation, seq=seq, payload=b"",
                                       final=final), timeout=timeout) for target in job.fanout.targets]
        if len(writes) == 1:
            job.bytes_sent += int(await writes[0] or 0)
            return
        results = await asyncio.gather(*writes, return_exceptions=True)  # all end (bounded) before any error
        for result in results:
            if isinstance(result, BaseException):
                raise result
        job.bytes_sent += sum(int(sent or 0) for sent in results)  # type: ignore[arg-type]


async def serve_prefill(config: WorkerConfig) -> WorkerRuntime:
    runtime = WorkerRuntime(config)
    pb_grpc.add_PrefillWorkerServicer_to_server(PrefillService(runtime), runtime.server)
    await runtime.start()
    return runtime
