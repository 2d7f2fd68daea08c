"""Sending a request to workers: pick a decode worker and ordered prefill candidates,
open the decode stream, and keep the request alive across worker failures.

- Before the first token, a decode worker that is unreachable or full is replaced by
  another one (`max_retries`); a full cluster is a 429, an unreachable one a 503.
- After tokens have streamed, a failed stream (the worker died, its connection broke,
  it went silent for `token_timeout`) *migrates*: another decode worker (or the same
  one, once it is routable again) resumes the request from the prompt plus the tokens
  already streamed, with the same sampling parameters. Decode computes their KV and
  sends only what follows, counting them for max_tokens, stop rules, penalties and
  seeds, so the client's stream goes on with nothing repeated or missing (greedy: the
  uninterrupted output; seeded: the same draws). At most `max_migrations` times; a
  migrating request waits up to `migration_timeout` for a decode worker to take it.

A turn of a session goes to the session's decode worker (its prefill worker first among
the candidates) while they are routable; else where the policy says, and the session
follows (router/sessions.py), its old decode worker told to drop the session's KV.

Every worker call has a deadline; a stream the router stops reading early (client gone,
stop string, Abort, a silent worker) is cancelled, and its decode worker is told to
Abort as well, so an old stream never sends into a migrated one. Outcomes feed each
worker's circuit breaker (router/breaker.py), decode's reports of its remote prefill
attempts included.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Protocol, Sequence

import grpc

from engine.multimodal import cache_keys
from engine.sampling_params import SamplingParams
from proto import epd_pb2, tracing
from router.config import RouterConfig
from router.errors import NoHealthyWorkers, Overloaded, RouterError, WorkerFailed
from router.plan import Plan
from router.policies import RouteRequest, create_policy
from router.registry import WorkerHandle, WorkerRegistry
from router.sessions import SessionDirectory, SessionRoute
from router.worker_state import WorkerState

if TYPE_CHECKING:
    from router.metrics import RouterMetrics
    from router.service import GenerationRequest

log = logging.getLogger("router.dispatch")
WAIT_POLL_S = 0.1  # a migrating request looks for a decode worker this often
# Failures that say nothing about the worker's health (the request's own fault, or load).
_NOT_WORKER_FAULTS = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "CANCELLED", "FAILED_PRECONDITION",
                      "OUT_OF_RANGE", "UNAUTHENTICATED", "PERMISSION_DENIED"}
# After tokens streamed, these end the request instead of migrating it: another worker
# would refuse it the same way.
_FINAL_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED}


class AbortFlag(Protocol):
    aborted: bool
    plan: Plan | None
    span: tracing.TraceSpan  # the request's span (tracing.NO_SPAN when tracing is off)


class _AttemptFailed(Exception):
    """One decode attempt ended without finishing the request."""

    def __init__(self, message: str, code: grpc.StatusCode, unreachable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.unreachable = unreachable  # the worker could not be reached or its stream broke

    @property
    def busy(self) -> bool:
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class _Progress:
    """A request's state across its attempts (owned by one `Dispatcher.stream`)."""

    tokens: list[int] = field(default_factory=list)  # streamed so far, over every attempt
    tried: set[str] = field(default_factory=set)
    retries: int = 0
    migrations: int = 0
    last_failure: _AttemptFailed | None = None


def sampling_to_proto(params: SamplingParams) -> epd_pb2.SamplingParams:
    from proto.convert import params_to_proto
    return params_to_proto(params)


class Dispatcher:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, metrics: RouterMetrics,
                 sessions: SessionDirectory | None = None) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.sessions = sessions if sessions is not None else SessionDirectory(config.max_sessions,
                                                                               config.session_idle_timeout)
        self.policy = create_policy(config.policy)
        self._background: set[asyncio.Task[None]] = set()

    def plan_encoders(self, num_images: int) -> list[list[WorkerHandle]]:
        """For each image, the routable encode workers, least loaded first (queued images
        as reported, or as routed here when that is higher). Images of one request spread:
        each one counts on its first choice before the next is placed. No encode workers:
        empty lists, and prefill encodes the images itself."""
        workers = self.registry.routable("encode")
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
        decode = [w for w in self.registry.routable("decode") if w.id not in exclude]
        if not decode:
            raise NoHealthyWorkers("no healthy decode worker is available" if not exclude else
                                   f"no other healthy decode worker to retry on (tried {sorted(exclude)})")
        session = self.sessions.get(route.session_id) if route.session_id else None
        chosen = _pick(decode, session.decode_id if session else "") or self.policy.rank_decode(route, decode)[0]
        prefill = self.policy.rank_prefill(route, self.registry.routable("prefill"))
        stuck = _pick(prefill, session.prefill_id if session else "")
        if stuck is not None:  # the session's prefill worker first: its cache holds the history
            prefill = [stuck, *(w for w in prefill if w is not stuck)]
        handles = [self.registry.get(w.id) for w in [chosen, *prefill[:self.config.max_prefill_candidates]]]
        if any(h is None for h in handles):
            raise NoHealthyWorkers("the worker set changed while routing; retry")
        if session is not None:
            self._follow(session, chosen.id, prefill[0].id if prefill else "")
        return Plan(handles[0], handles[1:], route, self.plan_encoders(num_images))

    def _follow(self, session: SessionRoute, decode_id: str, prefill_id: str) -> None:
        left = self.sessions.follow(session, decode_id, prefill_id)
        if left:
            self.metrics.session_moves.inc()
            log.info("session %s moves from decode worker %s to %s", session.session_id, left, decode_id)
            self.send_close_session(left, session.session_id)

    async def stream(self, request: GenerationRequest, active: AbortFlag) -> AsyncIterator[epd_pb2.DecodeResponse]:
        """The decode workers' responses for one request, as one stream: retried
        elsewhere before the first token, migrated after it (see the module docstring)."""
        keys = cache_keys(request.prompt_token_ids, request.images) if request.images else None
        route = RouteRequest(request.prompt_token_ids, keys, request.session_id)
        progress = _Progress()
        while not active.aborted:
            plan = await self._next_plan(route, request, progress)
            progress.tried.add(plan.decode_id)
            active.plan = plan
            span = tracing.start("router.decode_attempt", active.span, "client", worker=plan.decode_id,
                                 attempt=progress.retries + progress.migrations, prefill_candidates=len(plan.prefill),
                                 resumed_tokens=len(progress.tokens))
            try:
                async for response in self._attempt(plan, request, active, progress, span):
                    yield response
                return
            except _AttemptFailed as exc:
                span.fail(exc.message)
                self._after_failure(plan, exc, progress, request.request_id)
            except WorkerFailed as exc:
                span.fail(exc.message)
                raise
            finally:
                span.end()
                plan.release()

    async def _next_plan(self, route: RouteRequest, request: GenerationRequest, progress: _Progress) -> Plan:
        """A decode worker not tried yet; when migrating, any routable one (the same one
        back from a restart included), waiting up to `migration_timeout` for one."""
        num_images = len(request.images)
        try:
            return self.plan(route, progress.tried, num_images)
        except NoHealthyWorkers as exc:
            last = progress.last_failure
            if last is not None and last.busy and not progress.tokens:
                raise Overloaded(f"every decode worker is full; retry later ({last.message})",
                                 retry_after=self.config.retry_after) from None
            if not progress.tokens:
                raise
            error: RouterError = exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.migration_timeout
        while loop.time() < deadline:
            try:
                return self.plan(route, set(), num_images)
            except NoHealthyWorkers as exc:
                error = exc
            await asyncio.sleep(WAIT_POLL_S)
        raise WorkerFailed(f"no decode worker took the migrating request within "
                           f"{self.config.migration_timeout:g} s ({error.message})", grpc.StatusCode.UNAVAILABLE)

    def _after_failure(self, plan: Plan, exc: _AttemptFailed, progress: _Progress, request_id: str) -> None:
        """Count the failure against the worker; raise the request's final error when
        it may not go on, else return to try again."""
        progress.last_failure = exc
        if not exc.busy:
            plan.decode.state.breaker.record_failure(exc.message)
        if exc.unreachable:
            self.registry.mark_failed(plan.decode_id, exc.message)
        if progress.tokens:
            if exc.code in _FINAL_CODES or progress.migrations >= self.config.max_migrations:
                raise WorkerFailed(f"{exc.message} (after {progress.migrations} migration(s))", exc.code)
            progress.migrations += 1
            self.metrics.migrations.inc()
            log.warning("request %s: %s after %d token(s); migrating it", request_id, exc.message,
                        len(progress.tokens))
            return
        if not (exc.unreachable or exc.busy):
            raise WorkerFailed(exc.message, exc.code)
        if progress.retries >= self.config.max_retries:
            if exc.busy:
                raise Overloaded(f"every decode worker tried is full; retry later ({exc.message})",
                                 retry_after=self.config.retry_after)
            raise NoHealthyWorkers(f"no decode worker could take the request after {progress.retries + 1} "
                                   f"attempts (tried {sorted(progress.tried)})")
        progress.retries += 1
        self.metrics.retries.inc()
        log.warning("request %s: %s; retrying elsewhere", request_id, exc.message)

    def _decode_request(self, plan: Plan, request: GenerationRequest, resumed: Sequence[int]) -> epd_pb2.DecodeRequest:
        return epd_pb2.DecodeRequest(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            sampling=sampling_to_proto(request.params), resume_token_ids=resumed,
            prefill=[epd_pb2.PrefillCandidate(id=h.state.id, address=h.state.address) for h in plan.prefill],
            force_remote_prefill=self.config.force_remote_prefill,
            session_id=request.session_id, pin_prefix_tokens=request.pin_prefix_tokens,
            images=[epd_pb2.ImageData(data=image.data, hash=image.hash, offset=image.offset,
                                      num_tokens=image.num_tokens,
                                      encoders=[epd_pb2.WorkerCandidate(id=h.state.id, address=h.state.address)
                                                for h in encoders])
                    for image, encoders in zip(request.images, plan.encoders)])

    async def _attempt(self, plan: Plan, request: GenerationRequest, active: AbortFlag,
                       progress: _Progress, span: tracing.TraceSpan) -> AsyncIterator[epd_pb2.DecodeResponse]:
        message = self._decode_request(plan, request, progress.tokens)
        mux = plan.decode.mux
        if mux is not None:  # one stream per decode worker for every request (router/decode_mux.py)
            call = mux.generate(message, self.config.request_timeout, span.metadata())
        else:
            call = plan.decode.stub.Generate(message, timeout=self.config.request_timeout, metadata=span.metadata())
        plan.call = call
        silence = _Silence(call)
        got_token = ended = False
        try:
            while True:
                response = await self._read(plan, call, silence, got_token, active)
                if response is None:
                    ended = True
                    return
                if response.prefill_attempts:
                    self._record_prefill(response.prefill_attempts)
                event = response.WhichOneof("event")
                if not got_token and (event == "finished" or response.chunk.token_ids):
                    got_token = True
                    plan.prefill_done()
                    plan.decode.state.breaker.record_success()
                if event == "chunk":
                    progress.tokens.extend(response.chunk.token_ids)
                ended = event == "finished"
                yield response
        except _AttemptFailed as exc:
            ended = exc.code != grpc.StatusCode.DEADLINE_EXCEEDED  # a silent stream is still open
            raise
        finally:
            silence.stop()
            if not ended:  # stopped early: client gone, stop string, Abort, silent worker
                call.cancel()
                self.send_abort(plan.decode_id, request.request_id)

    def _record_prefill(self, attempts: Sequence[epd_pb2.PrefillAttempt]) -> None:
        for attempt in attempts:
            handle = self.registry.get(attempt.id)
            if handle is None or handle.state.address != attempt.address:
                continue
            if attempt.ok:
                handle.state.breaker.record_success()
            elif attempt.code not in _NOT_WORKER_FAULTS:
                handle.state.breaker.record_failure(f"prefill {attempt.code}: {attempt.error}")

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
                raise _AttemptFailed(f"decode worker {worker} sent nothing for {timeout:g} s",
                                     grpc.StatusCode.DEADLINE_EXCEEDED) from None
            if active.aborted:
                return None  # Abort cancelled the call, not this task
            # Nobody cancelled this task: the call was (its channel closed under it).
            raise _AttemptFailed(f"decode worker {worker}: the stream was cancelled (its channel closed)",
                                 grpc.StatusCode.UNAVAILABLE, unreachable=True) from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and silence.expired:
                raise _AttemptFailed(f"decode worker {worker} sent nothing for {timeout:g} s",
                                     grpc.StatusCode.DEADLINE_EXCEEDED) from None
            if exc.code() == grpc.StatusCode.CANCELLED and active.aborted:
                return None
            raise _AttemptFailed(f"decode worker {worker} failed: {exc.code().name}: {exc.details()}",
                                 exc.code(), unreachable=exc.code() == grpc.StatusCode.UNAVAILABLE) from None
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

    def send_close_session(self, decode_id: str, session_id: str) -> None:
        """Tell a decode worker to drop a session's KV, in the background (best effort:
        a dead worker holds nothing, a live one would release it on its own timeout)."""
        handle = self.registry.get(decode_id)
        if handle is not None:
            self._background_call(handle.stub.CloseSession(epd_pb2.CloseSessionRequest(session_id=session_id),
                                                           timeout=self.config.abort_timeout), decode_id)

    async def close_session(self, decode_id: str, session_id: str) -> bool:
        """Ask a decode worker to drop a session's KV; whether it held any (False also
        when the worker cannot be reached: then it holds nothing we could free)."""
        handle = self.registry.get(decode_id)
        if handle is None:
            return False
        try:
            reply = await handle.stub.CloseSession(epd_pb2.CloseSessionRequest(session_id=session_id),
                                                   timeout=self.config.abort_timeout)
        except grpc.aio.AioRpcError as exc:
            log.info("closing session %s on %s: %s", session_id, decode_id, exc.code().name)
            return False
        return reply.found

    def _background_call(self, call: Awaitable[object], worker: str) -> None:
        async def run() -> None:
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                log.debug("background call to %s: %s", worker, exc.code().name)
        task = asyncio.ensure_future(run())
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


def _pick(workers: Sequence[WorkerState], worker_id: str) -> WorkerState | None:
    """The worker of that id among `workers` (routable ones), if any."""
    return next((w for w in workers if w.id == worker_id), None) if worker_id else None


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
