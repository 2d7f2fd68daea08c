"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions (SSE when
streaming), models, health, cluster status (/cluster, the /dashboard page) and Prometheus
metrics.

A request is parsed and validated, admitted (429 when the router is full), and its
choices started; errors before any choice's first token answer with a status code.
A client that goes away cancels its generations (and so the decode streams).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.multimodal import ImageInput
from router.admission import Slot
from router.admin import add_admin_routes
from router.auth import AccessPolicy, install, require_metrics, require_user
from router.errors import InvalidRequest, RouterError, WorkerFailed
from router.sessions import parse_session_id
from router.cluster_view import ClusterView
from router.dashboard_page import DASHBOARD_HTML
from router.metrics import CONTENT_TYPE
from router.openapi import ERROR_RESPONSES, describe_bodies
from router.openai_format import Choice, ResponseFormatter, error_body, sse_bytes, usage_body
from router.openai_protocol import (ChatCompletionRequest, CompletionRequest, PromptSpec, SamplingFields,
                                    chat_logprobs, chat_max_tokens, chat_messages, check_body_size,
                                    completion_prompts, parse_body, sampling_options, validate_model)
from router.service import OFF_LOOP_BYTES, Finish, GenerationRequest, RouterService, TokenDelta

logger = logging.getLogger(__name__)
T = TypeVar("T")
SESSION_HEADER = "X-Session-Id"

def error_response(exc: RouterError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.http_status, headers=exc.http_headers())


@dataclass
class Job:
    """One HTTP request's generations: choice i is requests[i]."""

    formatter: ResponseFormatter
    requests: list[GenerationRequest]
    first_of_prompt: list[bool]  # choice i is the first choice of its prompt (usage counts it)
    stream: bool
    include_usage: bool
    session_id: str = ""  # echoed in the response's X-Session-Id header


class Fanout:
    """Runs a job's generations concurrently, merging their events in arrival order."""

    def __init__(self, service: RouterService, requests: list[GenerationRequest]) -> None:
        self._queue: asyncio.Queue[tuple[int, TokenDelta | Finish | BaseException]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(i, service.generate(r))) for i, r in enumerate(requests)]
        self._buffer: list[tuple[int, TokenDelta | Finish]] = []
        self._open = len(requests)

    async def _pump(self, index: int, events: AsyncIterator[TokenDelta | Finish]) -> None:
        try:
            async with aclosing(events) as stream:
                async for event in stream:
                    await self._queue.put((index, event))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await self._queue.put((index, exc))

    async def start(self) -> None:
        """Wait until every choice has produced something; raise the first error if a
        choice failed before its first token (nothing has been sent yet)."""
        seen: set[int] = set()
        while len(seen) < len(self._tasks):
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            seen.add(index)
            self._buffer.append((index, item))

    async def events(self) -> AsyncIterator[tuple[int, TokenDelta | Finish]]:
        for index, event in self._buffer:
            self._open -= isinstance(event, Finish)
            yield index, event
        self._buffer = []
        while self._open > 0:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            self._open -= isinstance(item, Finish)
            yield index, item

    @property
    def unfinished(self) -> int:
        """Choices whose Finish has not been read yet."""
        return self._open

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class SingleStream:
    """A job of one generation (the common case), read in place: the same interface as
    Fanout without its pump task and queue hop per token."""

    def __init__(self, service: RouterService, request: GenerationRequest) -> None:
        self._events = service.generate(request)
        self._first: TokenDelta | Finish | None = None
        self._open = 1

    async def start(self) -> None:
        """Wait for the first event; a RouterError before it propagates."""
        try:
            self._first = await self._events.__anext__()
        except StopAsyncIteration:
            raise WorkerFailed("the generation ended without an event") from None

    async def events(self) -> AsyncIterator[tuple[int, TokenDelta | Finish]]:
        first, self._first = self._first, None
        if first is not None:
            self._open -= isinstance(first, Finish)
            yield 0, first
        async for event in self._events:
            self._open -= isinstance(event, Finish)
            yield 0, event

    @property
    def unfinished(self) -> int:
        return self._open

    async def close(self) -> None:
        await self._events.aclose()


def _session_id(req: SamplingFields, header: str | None, num_prompts: int) -> str:
    """The request's session (from `session_id` or the X-Session-Id header; "" for
    none). A session continues one conversation: one prompt, one choice."""
    body = parse_session_id(req.session_id) if req.session_id is not None else None
    given = parse_session_id(header, param=SESSION_HEADER) if header is not None else None
    if body is not None and given is not None and body != given:
        raise InvalidRequest(f"the {SESSION_HEADER} header ({given!r}) and session_id ({body!r}) differ",
                             param="session_id")
    session = body or given or ""
    if session and req.n != 1:
        raise InvalidRequest("a session continues one conversation: n must be 1", param="n")
    if session and num_prompts != 1:
        raise InvalidRequest("a session continues one conversation: send one prompt", param="prompt")
    return session


def _pin_count(value: int | str | None) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        raise InvalidRequest(f'pin_prefix must be a token count (or "system" for chat messages), got {value!r}',
                             param="pin_prefix")
    return value


def start_job(service: RouterService, requests: list[GenerationRequest]) -> Fanout | SingleStream:
    return SingleStream(service, requests[0]) if len(requests) == 1 else Fanout(service, requests)


class _ClosingStreamingResponse(StreamingResponse):
    """Runs `on_close` however the response ends (a client gone mid-stream included),
    so the generations stop at once rather than when the iterator is collected."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class _ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (Starlette does not
    notice a disconnect on its own until it writes the response)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone()
    return task.result()


class OpenAIServer:
    def __init__(self, service: RouterService) -> None:
        self.service = service

    async def read_body(self, request: Request) -> bytes:
        limit = self.service.config.max_request_bytes
        check_body_size(request.headers.get("content-length"), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            check_body_size(str(len(body)), limit)
        return bytes(body)

    def _formatter(self, kind: str, logprobs: bool) -> ResponseFormatter:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return ResponseFormatter(kind, f"{prefix}-{uuid.uuid4().hex}", self.service.model.name, int(time.time()),
                                 self.service.tokenizer, logprobs)

    def _requests(self, formatter: ResponseFormatter, prompts: list[list[int]], req: SamplingFields,
                  options: dict[str, Any], images: Sequence[ImageInput] = (), session: str = "",
                  pin: int = 0) -> tuple[list[GenerationRequest], list[bool]]:
        requests, first = [], []
        for p, prompt in enumerate(prompts):
            for j in range(req.n):
                choice_seed = None if req.seed is None else req.seed + j
                index = p * req.n + j
                requests.append(self.service.prepare(f"{formatter.response_id}-{index}", prompt,
                                                     {**options, "seed": choice_seed}, images, session, pin))
                first.append(j == 0)
        return requests, first

    def chat_job(self, body: dict[str, Any], session_header: str | None = None) -> Job:
        req = validate_model(ChatCompletionRequest, body)
        self.service.check_model(req.model)
        session = _session_id(req, session_header, 1)
        logprobs = chat_logprobs(req)
        options = sampling_options(req, chat_max_tokens(req), logprobs)
        messages, image_urls = chat_messages(req)
        datas = self.service.images.load(image_urls)  # checked before the template runs
        prompt = self.service.encode_chat(messages, req.add_generation_prompt, req.chat_template_kwargs)
        pin = self._chat_pin(req, messages, prompt)
        prompt, images = self.service.images.expand(prompt, datas)
        formatter = self._formatter("chat", logprobs is not None)
        requests, first = self._requests(formatter, [prompt], req, options, images, session, pin)
        return Job(formatter, requests, first, req.stream, bool(req.stream_options and req.stream_options.include_usage),
                   session)

    def _chat_pin(self, req: ChatCompletionRequest, messages: list[dict[str, Any]], prompt: list[int]) -> int:
        if req.pin_prefix != "system":
            return _pin_count(req.pin_prefix)
        system = []
        for message in messages:
            if message["role"] not in ("system", "developer"):
                break
            system.append(message)
        if not system:
            raise InvalidRequest('pin_prefix "system" needs the conversation to start with a system message',
                                 param="pin_prefix")
        return self.service.shared_prefix(prompt, self.service.encode_chat(system, False, req.chat_template_kwargs))

    def completion_job(self, body: dict[str, Any], session_header: str | None = None) -> Job:
        req = validate_model(CompletionRequest, body)
        self.service.check_model(req.model)
        options = sampling_options(req, req.max_tokens, req.logprobs)
        prompts = [self.service.images.expand(self._tokens(spec), [], "prompt")[0]
                   for spec in completion_prompts(req)]  # refuses image placeholders: no images here
        session = _session_id(req, session_header, len(prompts))
        formatter = self._formatter("completion", req.logprobs is not None)
        requests, first = self._requests(formatter, prompts, req, options, session=session,
                                         pin=_pin_count(req.pin_prefix))
        return Job(formatter, requests, first, req.stream, bool(req.stream_options and req.stream_options.include_usage),
                   session)

    def _tokens(self, spec: PromptSpec) -> list[int]:
        return self.service.encode_text(spec.text) if spec.text is not None else list(spec.token_ids or [])

    async def handle(self, request: Request, build: Callable[[dict[str, Any], str | None], Job]) -> Response:
        session_header = request.headers.get(SESSION_HEADER)
        try:
            body = await self.read_body(request)
            # Image URLs may be fetched (blocking, bounded by a timeout): never on the loop.
            size = len(body) if b"image_url" not in body else OFF_LOOP_BYTES + 1
            job = await self.service.off_loop(size, lambda: build(parse_body(body), session_header))
        except RouterError as exc:
            self.service.record_error(exc)
            return error_response(exc)
        response = await self._answer(request, job)
        if job.session_id:
            response.headers[SESSION_HEADER] = job.session_id
        return response

    async def _answer(self, request: Request, job: Job) -> Response:
        try:
            slot = await self.service.admit()
        except RouterError as exc:
            return error_response(exc)
        fanout = start_job(self.service, job.requests)
        streaming = False
        try:
            await _unless_disconnected(request, fanout.start())
            if job.stream:
                streaming = True  # the response now owns the fanout and the slot
                return self._stream(job, fanout, slot)
            return await _unless_disconnected(request, self._collect(job, fanout))
        except RouterError as exc:
            return error_response(exc)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:
                await fanout.close()
                slot.release()

    def _stream(self, job: Job, fanout: Fanout | SingleStream, slot: Slot) -> Response:
        async def close() -> None:
            if fanout.unfinished:
                logger.info("request %s: the HTTP stream ended with %d of %d choices unfinished (client gone); "
                            "cancelling them", job.requests[0].request_id, fanout.unfinished, len(job.requests))
            await fanout.close()
            slot.release()

        return _ClosingStreamingResponse(self._sse(job, fanout), close)

    async def _sse(self, job: Job, fanout: Fanout | SingleStream) -> AsyncIterator[bytes]:
        choices = [Choice(i) for i in range(len(job.requests))]
        usages = []
        async for index, event in fanout.events():
            if isinstance(event, Finish):
                if event.reason == "error":
                    yield sse_bytes(error_body(WorkerFailed(event.error or "generation failed")))
                    break
                usages.append((index, event.usage))
            data = job.formatter.stream_bytes(choices[index], event)
            if data:
                yield data
        else:
            if job.include_usage:
                ordered = sorted(usages)
                body = usage_body([u for _, u in ordered], [job.first_of_prompt[i] for i, _ in ordered])
                yield sse_bytes(job.formatter.usage_chunk(body))
        yield b"data: [DONE]\n\n"

    async def _collect(self, job: Job, fanout: Fanout | SingleStream) -> Response:
        choices = [Choice(i) for i in range(len(job.requests))]
        async for index, event in fanout.events():
            job.formatter.add(choices[index], event)
        failed = next((c.finish for c in choices if c.finish and c.finish.reason == "error"), None)
        if failed is not None:
            return error_response(WorkerFailed(failed.error or "generation failed"))
        usage = usage_body([c.finish.usage for c in choices if c.finish], job.first_of_prompt)
        return JSONResponse(job.formatter.response(choices, usage))


def add_session_routes(app: FastAPI, service: RouterService, guard: list[Any]) -> None:
    """`POST /v1/sessions` (a new session, with an id made here), `GET` and `DELETE
    /v1/sessions/{id}` (404 for one the router does not know)."""

    @app.post("/v1/sessions", dependencies=guard)
    async def create_session() -> dict[str, Any]:
        return service.open_session().describe(service.sessions.clock())

    @app.get("/v1/sessions/{session_id}", dependencies=guard)
    async def get_session(session_id: str) -> dict[str, Any]:
        return service.session(session_id).describe(service.sessions.clock())

    @app.delete("/v1/sessions/{session_id}", dependencies=guard)
    async def delete_session(session_id: str) -> dict[str, Any]:
        route, released = await service.close_session(session_id)
        return {"id": route.session_id, "object": "session", "deleted": True, "released_kv": released}


def create_app(service: RouterService) -> FastAPI:
    app = FastAPI(title="epd-serve router", docs_url=None, redoc_url=None)
    install(app, AccessPolicy.from_config(service.config))
    describe_bodies(app)
    server = OpenAIServer(service)
    user = [Depends(require_user)]

    @app.post("/v1/chat/completions", dependencies=user, responses=ERROR_RESPONSES)
    async def chat_completions(request: Request) -> Response:
        return await server.handle(request, server.chat_job)

    @app.post("/v1/completions", dependencies=user, responses=ERROR_RESPONSES)
    async def completions(request: Request) -> Response:
        return await server.handle(request, server.completion_job)

    @app.get("/v1/models", dependencies=user)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.model.name, "object": "model", "created": 0,
                                            "owned_by": "epd-serve", "max_model_len": service.max_model_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        registry = service.registry
        ready = registry.ready()
        body = {"status": "ready" if ready else "not ready", "healthy_prefill": len(registry.healthy("prefill")),
                "healthy_decode": len(registry.healthy("decode")), "healthy_encode": len(registry.healthy("encode"))}
        return JSONResponse(body, status_code=200 if ready else 503)

    view = ClusterView(service)

    @app.get("/cluster", dependencies=user)
    async def cluster(request: Request) -> Response:
        kind = request.query_params.get("view", "workers")
        if kind == "workers":
            return JSONResponse(view.workers())
        if kind == "overview":
            return JSONResponse(view.overview())
        return error_response(InvalidRequest(f"unknown view {kind!r}: use workers (the default) or overview",
                                             param="view"))

    @app.get("/dashboard", dependencies=user, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML, headers={"Cache-Control": "no-store"})

    add_session_routes(app, service, user)
    add_admin_routes(app, service)

    @app.get("/metrics", dependencies=[Depends(require_metrics)])
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return app
