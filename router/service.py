"""The request flow shared by the gRPC and HTTP front ends: tokenize, validate, route,
stream from a decode worker (retrying elsewhere before the first token), detokenize,
stop strings, usage, metrics, aborts.

A generation yields `TokenDelta`s and ends with one `Finish`; errors before the first
token raise a `RouterError` instead, so the front end can answer with a status code.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence, TypeVar

from engine.errors import EngineError
from engine.multimodal import ImageInput, MultimodalInfo
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from proto import epd_pb2, tracing
from router.admission import Admission, Slot
from router.config import RouterConfig
from router.detokenize import TextStream
from router.dispatch import Dispatcher
from router.plan import Plan
from router.images import ImageLoader
from router.errors import (ContextLengthExceeded, InvalidRequest, ModelNotFound, RouterError, SessionNotFound,
                           WorkerFailed)
from router.metrics import RouterMetrics
from router.pins import PinManager
from router.registry import WorkerRegistry
from router.sessions import SessionDirectory, SessionRoute, parse_session_id
from router.autoscaler import RecentLatency
from router.cluster_view import RecentErrors

if TYPE_CHECKING:
    from router.pools import PoolManager

log = logging.getLogger("router.service")

_FINISH_REASONS = {
    epd_pb2.FINISH_REASON_STOP: "stop",
    epd_pb2.FINISH_REASON_LENGTH: "length",
    epd_pb2.FINISH_REASON_ABORT: "abort",
    epd_pb2.FINISH_REASON_ERROR: "error",
}

T = TypeVar("T")
OFF_LOOP_BYTES = 8192  # inputs above this are parsed and tokenized off the event loop


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: prompt tokens and sampling parameters with max_tokens set."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    images: tuple[ImageInput, ...] = ()  # with their bytes, over expanded placeholders
    session_id: str = ""  # a turn of this session (router/sessions.py); "" for none
    pin_prefix_tokens: int = 0  # pin this many leading prompt tokens on the workers it reaches


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenDelta:
    token_ids: list[int]
    text: str
    logprobs: list[epd_pb2.TokenLogprob]


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop", "length", "abort" or "error"
    stop_reason: str | int | None  # the stop string or stop token that ended it
    usage: Usage
    text: str  # the whole output text (stop string excluded)
    token_ids: list[int]
    error: str | None = None


Event = TokenDelta | Finish


class _Active:
    """A generation in progress, findable by request id for Abort."""

    def __init__(self) -> None:
        self.aborted = False
        self.plan: Plan | None = None
        self.span = tracing.NO_SPAN


class RouterService:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, tokenizer: Tokenizer,
                 model: ModelInfo, metrics: RouterMetrics, multimodal: MultimodalInfo | None = None) -> None:
        self.config = config
        self.images = ImageLoader(config, multimodal)
        self.registry = registry
        self.pools: PoolManager | None = None  # set by RouterApp (router/pools.py)
        self.pins = PinManager(registry, config)  # prefixes pinned through the admin API
        self.latency = RecentLatency(config.autoscale_window)  # what the autoscaler reads
        self.tokenizer = tokenizer
        self.model = model
        self.metrics = metrics
        self.recent_errors = RecentErrors()  # for /cluster?view=overview and /dashboard
        self.admission = Admission(config.max_concurrent_requests, config.max_queued_requests, config.retry_after)
        metrics.running.set_function(lambda: self.admission.running)
        metrics.queued.set_function(lambda: self.admission.queued)
        self.sessions = SessionDirectory(config.max_sessions, config.session_idle_timeout)
        metrics.sessions_open.set_function(lambda: len(self.sessions))
        self.dispatcher = Dispatcher(config, registry, metrics, self.sessions)
        self._active: dict[str, _Active] = {}
        self._ids = itertools.count()

    # -- input -----------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name and name != self.model.name:
            raise ModelNotFound(f"The model `{name}` does not exist; this router serves "
                                f"`{self.model.name}`", param="model")

    @property
    def max_model_len(self) -> int:
        """The model's context length, lowered to what any healthy worker reports."""
        reported = [w.load.max_model_len for w in self.registry.healthy("decode") if w.load.max_model_len]
        return min([self.model.max_model_len, *reported])

    async def off_loop(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` (request parsing and tokenization) in a worker thread when the
        input is large (`size` bytes or characters above OFF_LOOP_BYTES), inline
        otherwise: encoding a long prompt must not stall the loop that streams every
        other request's tokens (the tokenizer releases the GIL while it encodes, and is
        safe to share across threads). Small inputs are cheaper than a thread hop."""
        if size > OFF_LOOP_BYTES:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt, **(template_kwargs or {}))
        except EngineError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
        return self.tokenizer.encode(text, add_special_tokens=False)

    @staticmethod
    def shared_prefix(prompt: list[int], prefix: list[int]) -> int:
        """Leading tokens `prompt` shares with `prefix` (a rendered system prompt may end
        in tokens that merge differently once more text follows)."""
        n = min(len(prompt), len(prefix))
        return n if prompt[:n] == prefix[:n] else next(i for i in range(n) if prompt[i] != prefix[i])

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:16]}-{next(self._ids)}"

    def prepare(self, request_id: str, prompt_token_ids: Sequence[int], sampling: dict[str, Any],
                images: Sequence[ImageInput] = (), session_id: str = "",
                pin_prefix_tokens: int = 0) -> GenerationRequest:
        """Validate a prompt and sampling options (SamplingParams' fields; `max_tokens`
        None means the rest of the context) into a GenerationRequest. `images`: from
        `self.images.expand`, over the prompt's expanded placeholders. `session_id`
        (checked already, see `parse_session_id`) and `pin_prefix_tokens`: see
        GenerationRequest."""
        prompt = list(prompt_token_ids)
        self.check_prompt(prompt)
        if isinstance(pin_prefix_tokens, bool) or not isinstance(pin_prefix_tokens, int) or not (
                0 <= pin_prefix_tokens <= len(prompt)):
            raise InvalidRequest(f"pin_prefix must be a token count in [0, {len(prompt)}] (the prompt's length), "
                                 f"got {pin_prefix_tokens!r}", param="pin_prefix")
        options = dict(sampling)
        options["max_tokens"] = self._resolve_max_tokens(len(prompt), options.get("max_tokens"))
        try:
            params = SamplingParams(**options)
        except EngineError as exc:
            raise InvalidRequest(str(exc), param=_param_of(str(exc), options)) from exc
        except TypeError as exc:
            raise InvalidRequest(f"bad sampling parameters: {exc}") from exc
        return GenerationRequest(request_id, prompt, params, images=tuple(images), session_id=session_id,
                                 pin_prefix_tokens=pin_prefix_tokens)

    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        vocab = self.model.vocab_size
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad!r} is outside the vocabulary [0, {vocab})", param="prompt")
        context = self.max_model_len
        if len(prompt) >= context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, your prompt has "
                f"{len(prompt)} tokens, and at least one token must be generated. Please reduce the "
                "length of the prompt.", param="prompt")

    def _resolve_max_tokens(self, prompt_len: int, max_tokens: object) -> int:
        context = self.max_model_len
        if max_tokens is None:
            return context - prompt_len
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise InvalidRequest(f"max_tokens must be an integer, got {max_tokens!r}", param="max_tokens")
        if max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if prompt_len + max_tokens > context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                "completion). Please reduce the length of the prompt or completion.", param="max_tokens")
        return max_tokens

    # -- admission and outcomes ------------------------------------------------------

    async def admit(self) -> Slot:
        try:
            slot = await self.admission.acquire()
        except RouterError as exc:
            self.record_error(exc)
            raise
        self.metrics.queue_time.observe(slot.queue_time)
        return slot

    def record_error(self, exc: RouterError) -> None:
        self.metrics.requests(exc.metric_label).inc()
        self.recent_errors.add(exc.metric_label, exc.message)

    async def abort(self, request_id: str) -> bool:
        active = self._active.get(request_id)
        if active is None:
            return False
        active.aborted = True
        if active.plan is not None:
            active.plan.cancel()
            self.dispatcher.send_abort(active.plan.decode_id, request_id)
        return True

    # -- sessions --------------------------------------------------------------------

    def session(self, session_id: str) -> SessionRoute:
        """A known session (SessionNotFound otherwise)."""
        route = self.sessions.get(parse_session_id(session_id))
        if route is None:
            raise SessionNotFound(f"no session {session_id!r}: never opened here, closed, or idle for longer "
                                  f"than {self.config.session_idle_timeout:g} s", param="session_id")
        return route

    def open_session(self) -> SessionRoute:
        """A new session with an id made here (clients may also pick their own)."""
        return self.sessions.open(f"sess-{uuid.uuid4().hex}")

    async def close_session(self, session_id: str) -> tuple[SessionRoute, bool]:
        """Forget a session and release its KV on its decode worker; (its route,
        whether the worker held KV for it)."""
        route = self.session(session_id)
        self.sessions.close(route.session_id)
        released = bool(route.decode_id) and await self.dispatcher.close_session(route.decode_id, route.session_id)
        return route, released

    # -- generation ------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream one generation. Raises RouterError only before anything was yielded."""
        if request.request_id in self._active:
            exc = InvalidRequest(f"request id {request.request_id!r} is already in use", param="request_id")
            self.record_error(exc)
            raise exc
        active = _Active()
        self._active[request.request_id] = active
        run = _Run(self, request, active)
        if request.session_id:
            self.sessions.open(request.session_id).turns += 1
        try:
            async with aclosing(run.events()) as events:
                async for event in events:
                    yield event
        finally:
            self._active.pop(request.request_id, None)
            if request.session_id:
                self.sessions.touch(request.session_id)


class _Run:
    """One generation's bookkeeping: text, tokens, timing, and its finish."""

    def __init__(self, service: RouterService, request: GenerationRequest, active: _Active) -> None:
        self.service = service
        self.request = request
        self.active = active
        params = request.params
        self.text = TextStream(service.tokenizer, params.stop, params.skip_special_tokens)
        self.tokens: list[int] = []
        self.cached_tokens = 0
        self.last_token_at: float | None = None

    async def events(self) -> AsyncIterator[Event]:
        request = self.request
        self.active.span = tracing.start("router.generate", None, "server", request_id=request.request_id,
                                         model=self.service.model.name, prompt_tokens=len(request.prompt_token_ids),
                                         max_tokens=request.params.max_tokens, images=len(request.images))
        try:
            async with aclosing(self._events()) as events:  # closing this closes the stream at once
                async for event in events:
                    yield event
        finally:
            self.active.span.end()

    async def _events(self) -> AsyncIterator[Event]:
        self.service.metrics.prompt_tokens.inc(len(self.request.prompt_token_ids))
        try:
            finish = None
            async with aclosing(self.service.dispatcher.stream(self.request, self.active)) as responses:
                async for response in responses:
                    if response.WhichOneof("event") == "finished":
                        finish = self._on_finished(response.finished)
                        break
                    delta = self._on_chunk(response.chunk)
                    if delta is not None:
                        yield delta
                    if self.text.stopped:  # the router saw a stop string first: cut the stream
                        finish = self._make_finish("stop", self.text.stop_string)
                        break
            finish = finish or self._stream_ended()
        except RouterError as exc:
            self.active.span.fail(exc.message)
            if not self.tokens:
                self.service.record_error(exc)
                raise
            finish = self._error_finish(exc.message)
        except asyncio.CancelledError:
            self.service.metrics.requests("aborted").inc()
            raise
        tail = self.text.finish()
        if tail:
            yield TokenDelta([], tail, [])
        finish = self._with_text(finish)
        self._observe_finish(finish)
        yield finish

    def _stream_ended(self) -> Finish:
        if self.active.aborted:
            return self._make_finish("abort", None)
        return self._error_finish("the decode worker ended the stream without finishing")

    def _on_chunk(self, chunk: epd_pb2.TokenChunk) -> TokenDelta | None:
        room = self.request.params.max_tokens - len(self.tokens)
        ids = list(chunk.token_ids)[:room]
        if not ids:
            return None
        now = time.monotonic()
        metrics = self.service.metrics
        if self.last_token_at is None:
            self.active.span.event("first_token")
            metrics.ttft.observe(now - self.request.arrival)
            self.service.latency.ttft.add(now - self.request.arrival, now)
        else:
            metrics.itl.observe(now - self.last_token_at)
            self.service.latency.itl.add(now - self.last_token_at, now)
        self.last_token_at = now
        self.tokens.extend(ids)
        return TokenDelta(ids, self.text.push(ids), list(chunk.logprobs)[:len(ids)])

    def _on_finished(self, finished: epd_pb2.Finished) -> Finish:
        self.cached_tokens = finished.usage.cached_tokens
        reason = _FINISH_REASONS.get(finished.reason, "error")
        if reason == "error":
            message = finished.error or "the decode worker failed"
            if not self.tokens:
                raise WorkerFailed(message)  # counted by events()
            return self._error_finish(message)
        stop_reason: str | int | None = None
        if finished.stop_string:
            stop_reason = finished.stop_string
        elif finished.HasField("stop_token"):
            stop_reason = finished.stop_token
        return self._make_finish(reason, stop_reason)

    def _error_finish(self, message: str) -> Finish:
        log.warning("request %s failed after %d tokens: %s", self.request.request_id, len(self.tokens), message)
        plan = self.active.plan
        self.service.recent_errors.add("error", f"failed after {len(self.tokens)} tokens: {message}",
                                       plan.decode_id if plan is not None else "")
        return self._make_finish("error", None, message)

    def _make_finish(self, reason: str, stop_reason: str | int | None, error: str | None = None) -> Finish:
        usage = Usage(len(self.request.prompt_token_ids), len(self.tokens), self.cached_tokens)
        return Finish(reason, stop_reason, usage, "", list(self.tokens), error)

    def _with_text(self, finish: Finish) -> Finish:
        """Attach the final text; a stop string the router found is the stop reason."""
        reason, stop_reason = finish.reason, finish.stop_reason
        if self.text.stopped and reason in ("stop", "length"):
            reason, stop_reason = "stop", self.text.stop_string
        return Finish(reason, stop_reason, finish.usage, self.text.text, finish.token_ids, finish.error)

    def _observe_finish(self, finish: Finish) -> None:
        self.active.span.set(finish_reason=finish.reason, output_tokens=len(self.tokens),
                             cached_tokens=self.cached_tokens)
        if finish.error:
            self.active.span.fail(finish.error)
        metrics = self.service.metrics
        status = {"stop": "ok", "length": "ok", "abort": "aborted"}.get(finish.reason, "error")
        metrics.requests(status).inc()
        metrics.e2e.observe(time.monotonic() - self.request.arrival)
        metrics.generation_tokens.inc(len(self.tokens))
        metrics.cached_tokens.inc(self.cached_tokens)


def _param_of(message: str, options: dict[str, Any]) -> str | None:
    """The sampling field an engine validation message is about (it starts with the name)."""
    first = message.split(" ", 1)[0]
    return first if first in options or first in ("stop", "logprobs", "seed") else None
