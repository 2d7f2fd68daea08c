"""Sending a request to workers: pick a decode worker and ordered prefill candidates,
open the decode stream, and move to another decode worker when the stream fails as
unreachable before the first token. After the first token a failure is final.

Every worker call has a deadline; a stream the router stops reading early (client gone,
stop string, Abort) is cancelled, and the decode worker is told to Abort as well.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, AsyncIterator, Protocol

import grpc

from engine.multimodal import cache_keys
from engine.sampling_params import SamplingParams
from proto import epd_pb2, tracing
from router.config import RouterConfig
from router.errors import NoHealthyWorkers, WorkerFailed
from router.policies import RouteRequest, create_policy
from router.registry import WorkerHandle, WorkerRegistry
from router.worker_state import Lease

if TYPE_CHECKING:
    from router.metrics import RouterMetrics
    from router.service import GenerationRequest

log = logging.getLogger("router.dispatch")


class AbortFlag(Protocol):
    aborted: bool
    plan: Plan | None
    span: tracing.TraceSpan  # the request's span (tracing.NO_SPAN when tracing is off)


class _Unreachable(Exception):
    """The decode worker could not be reached before the first token: try another."""


class Plan:
    """Where one attempt goes: a decode worker and the prefill workers it should try."""

    def __init__(self, decode: WorkerHandle, prefill: list[WorkerHandle], route: RouteRequest,
                 encoders: list[list[WorkerHandle]] | None = None) -> None:
        self.decode = decode
        self.prefill = prefill
        self.encoders = encoders or []  # per image, the encode workers to try in order
        self.call: grpc.aio.UnaryStreamCall | None = None
        self._leases: list[Lease] = [decode.state.lease()]
        if prefill:
            first = prefill[0].state
            page_size = first.load.page_size
            predicted = route.page_hashes(page_size) if page_size > 0 else []
            self._leases.append(first.lease(route.uncached_tokens(first), predicted))
        # Each image counts on its first encoder until the prompt is computed.
        self._encoding = [candidates[0].state for candidates in self.encoders if candidates]
        for state in self._encoding:
            state.inflight_images += 1

    @property
    def decode_id(self) -> str:
        return self.decode.state.id

    def prefill_done(self) -> None:
        for lease in self._leases:
            lease.prefill_done()
        for state in self._encoding:
            state.inflight_images -= 1
        self._encoding = []

    def release(self) -> None:
        self.prefill_done()
        for lease in self._leases:
            lease.close()

    def cancel(self) -> None:
        if self.call is not None:
            self.call.cancel()


def sampling_to_proto(params: SamplingParams) -> epd_pb2.SamplingParams:
    from proto.convert import params_to_proto
    return params_to_proto(params)


class Dispatcher:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, metrics: RouterMetrics) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.policy = create_policy(config.policy)
        self._background: set[asyncio.Task[None]] = set()

    def plan_encoders(self, num_images: int) -> list[list[WorkerHandle]]:
        """For each image, the healthy encode workers, least loaded first (queued images
        as reported, or as routed here when that is higher). Images of one request spread:
        each one counts on its first choice before the next is placed. No encode workers:
        empty lists, and prefill encodes the images itself."""
        workers = self.registry.healthy("encode")
        if not num_images or not workers:
            return [[] for _ in range(num_images)]
        planned = {w.id: 0 for w in workers}
        order: list[list[WorkerHandle]] = []
        for _ in range(num_images):
            ranked = sorted(workers, key=lambda w: (w.effective_queued_images() + planned[w.id], w.routed_total))
            planned[ranked[0].id] += 1
            handles = [h for h in (self.registry.get(w.id) for w in ranked) if h is not None]
            order.append(handles[:self.config.max_encode_candidates])
        return order

    def plan(self, route: RouteRequest, exclude: set[str], num_images: int = 0) -> Plan:
        decode = [w for w in self.registry.healthy("decode") if w.id not in exclude]
        if not decode:
            raise NoHealthyWorkers("no healthy decode worker is available" if not exclude else
                                   f"no other healthy decode worker to retry on (tried {sorted(exclude)})")
        chosen = self.policy.rank_decode(route, decode)[0]
        prefill = self.policy.rank_prefill(route, self.registry.healthy("prefill"))
        handles = [self.registry.get(w.id) for w in [chosen, *prefill[:self.config.max_prefill_candidates]]]
        if any(h is None for h in handles):
            raise NoHealthyWorkers("the worker set changed while routing; retry")
        return Plan(handles[0], handles[1:], route, self.plan_encoders(num_images))

    async def stream(self, request: GenerationRequest, active: AbortFlag) -> AsyncIterator[epd_pb2.DecodeResponse]:
        """The decode worker's responses for one request, retrying elsewhere while no
        token has arrived and the worker was unreachable."""
        keys = cache_keys(request.prompt_token_ids, request.images) if request.images else None
        route = RouteRequest(request.prompt_token_ids, keys)
        tried: set[str] = set()
        for attempt in range(self.config.max_retries + 1):
            plan = self.plan(route, tried, len(request.images))
            tried.add(plan.decode_id)
            active.plan = plan
            if attempt:
                self.metrics.retries.inc()
            span = tracing.start("router.decode_attempt", active.span, "client", worker=plan.decode_id,
                                 attempt=attempt, prefill_candidates=len(plan.prefill))
            try:
                async for response in self._attempt(plan, request, active, span):
                    yield response
                return
            except _Unreachable as exc:
                span.fail(str(exc))
                log.warning("request %s: %s; retrying elsewhere", request.request_id, exc)
                self.registry.mark_failed(plan.decode_id, str(exc))
            except WorkerFailed as exc:
                span.fail(exc.message)
                raise
            finally:
                span.end()
                plan.release()
        raise NoHealthyWorkers(f"no decode worker could take the request after "
                               f"{self.config.max_retries + 1} attempts (tried {sorted(tried)})")

    def _decode_request(self, plan: Plan, request: GenerationRequest) -> epd_pb2.DecodeRequest:
        return epd_pb2.DecodeRequest(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            sampling=sampling_to_proto(request.params),
            prefill=[epd_pb2.PrefillCandidate(id=h.state.id, address=h.state.address) for h in plan.prefill],
            force_remote_prefill=self.config.force_remote_prefill,
            images=[epd_pb2.ImageData(data=image.data, hash=image.hash, offset=image.offset,
                                      num_tokens=image.num_tokens,
                                      encoders=[epd_pb2.WorkerCandidate(id=h.state.id, address=h.state.address)
                                                for h in encoders])
                    for image, encoders in zip(request.images, plan.encoders)])

    async def _attempt(self, plan: Plan, request: GenerationRequest, active: AbortFlag,
                       span: tracing.TraceSpan) -> AsyncIterator[epd_pb2.DecodeResponse]:
        call = plan.decode.stub.Generate(self._decode_request(plan, request), timeout=self.config.request_timeout,
                                         metadata=span.metadata())
        plan.call = call
        silence = _Silence(call)
        got_token = ended = False
        try:
            while True:
                response = await self._read(plan, call, silence, got_token, active)
                if response is None:
                    ended = True
                    return
                if not got_token and response.WhichOneof("event") == "chunk" and response.chunk.token_ids:
                    got_token = True
                    plan.prefill_done()
                ended = response.WhichOneof("event") == "finished"
                yield response
        except (_Unreachable, WorkerFailed):
            ended = True
            raise
        finally:
            silence.stop()
            if not ended:  # stopped early: client gone, stop string, Abort, timeout
                call.cancel()
                self.send_abort(plan.decode_id, request.request_id)

    async def _read(self, plan: Plan, call: grpc.aio.UnaryStreamCall, silence: _Silence, got_token: bool,
                    active: AbortFlag) -> epd_pb2.DecodeResponse | None:
        """The next response; None at the end of the stream or after an Abort."""
        timeout = self.config.token_timeout if got_token else self.config.first_token_timeout
        worker = plan.decode_id
        silence.reading(timeout)
        try:
            response = await call.read()
        except asyncio.CancelledError:
            if _task_cancelling():
                raise  # this request's task is being cancelled (client gone)
            if silence.expired:
                raise WorkerFailed(f"decode worker {worker} sent nothing for {timeout:g} s",
                                   grpc.StatusCode.DEADLINE_EXCEEDED) from None
            if active.aborted:
                return None  # Abort cancelled the call, not this task
            # Nobody cancelled this task: the call was (its channel closed under it).
            message = f"decode worker {worker}: the stream was cancelled (its channel closed)"
            if not got_token:
                raise _Unreachable(message) from None
            raise WorkerFailed(message, grpc.StatusCode.UNAVAILABLE) from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and silence.expired:
                raise WorkerFailed(f"decode worker {worker} sent nothing for {timeout:g} s",
                                   grpc.StatusCode.DEADLINE_EXCEEDED) from None
            if exc.code() == grpc.StatusCode.CANCELLED and active.aborted:
                return None
            message = f"decode worker {worker} failed: {exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.UNAVAILABLE and not got_token:
                raise _Unreachable(message) from None
            raise WorkerFailed(message, exc.code()) from None
        finally:
            silence.idle()
        return None if response is grpc.aio.EOF else response

    def send_abort(self, decode_id: str, request_id: str) -> None:
        """Tell the decode worker to abort, in the background (best effort)."""
        handle = self.registry.get(decode_id)
        if handle is None:
            return
        task = asyncio.ensure_future(self._abort(handle, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, handle: WorkerHandle, request_id: str) -> None:
        try:
            await handle.stub.Abort(epd_pb2.AbortRequest(request_id=request_id), timeout=self.config.abort_timeout)
        except grpc.aio.AioRpcError as exc:
            log.debug("abort of %s on %s: %s", request_id, handle.state.id, exc.code().name)

    async def close(self) -> None:
        tasks = list(self._background)
        await asyncio.gather(*tasks, return_exceptions=True)


class _Silence:
    """Bounds how long one read of a decode stream may wait, with one timer per stream
    (re-armed only when it fires) instead of a timeout context per message: the timer
    checks the current read's start against its limit, and on expiry cancels the call,
    which ends the pending read. Time between reads (the client being slow) never counts."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self._loop = asyncio.get_running_loop()
        self._since = 0.0  # when the pending read began
        self._limit = 0.0
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self.expired = False

    def reading(self, limit: float) -> None:
        self._since, self._limit, self._busy = self._loop.time(), limit, True
        due = self._since + limit
        if self._timer is None or self._timer.when() > due:  # none yet, or the limit shrank
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(due, self._check)

    def idle(self) -> None:
        self._busy = False

    def _check(self) -> None:
        now = self._loop.time()
        if self._busy and now >= self._since + self._limit:
            self._timer = None
            self.expired = True
            self._call.cancel()
            return
        self._timer = self._loop.call_at((self._since if self._busy else now) + self._limit, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
