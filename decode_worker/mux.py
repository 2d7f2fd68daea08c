"""DecodeWorker.Stream on the worker: many requests over one stream (epd.proto).

Each start runs the Generate of `DecodeService` (`DecodeService.generate`) as its own
task, with a stand-in for the gRPC context: `abort` ends that request with an error event
instead of ending the stream, and the invocation metadata is the start's trace context.
Once the request is queued in the engine, its outputs no longer wake the task (it only
waits for the end, a cancel or the deadline): the engine loop writes each step's outputs
straight into new events of the request in the stream's one outbox (`emit` hands out
their empty responses). One writer sends whatever the outbox holds as one batch, so a step's tokens
for every request on the stream leave as one message: the worker's cost per token is an
event in a batch, not a gRPC message nor a task's turn.

A cancel (or the stream ending: the router went away) cancels the request's task, whose
Generate aborts the request in the engine as a cancelled Generate call does. When the
router half-closes the stream, the live requests run to their ends first.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto import status_codes


logger = logging.getLogger(__name__)


class RequestAborted(Exception):
    """`context.abort` of one multiplexed request: it ends with an error event."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class RequestContext:
    """What Generate uses of its ServicerContext, for one request of a stream."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self._metadata = tuple(metadata.items())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        # An event carries the code and details only: the router acts on the code (a full
        # worker's RESOURCE_EXHAUSTED means busy, try elsewhere), never on the trailers.
        raise RequestAborted(code, details)


class MuxSession:
    """One DecodeWorker.Stream call: its requests, outbox and writer."""

    def __init__(self, service: pb_grpc.DecodeWorkerServicer, context: grpc.aio.ServicerContext) -> None:
        self._service = service
        self._context = context
        self._live: dict[str, asyncio.Task[None]] = {}
        self._outbox: list[pb.DecodeStreamEvent] = []
        self._ready = asyncio.Event()  # the outbox has events, or the reader ended
        self._reading = True

    async def run(self, requests: AsyncIterator[pb.DecodeStreamRequest]) -> None:
        reader = asyncio.create_task(self._read(requests), name="decode-stream-reader")
        try:
            await self._write()
        finally:
            reader.cancel()
            tasks = list(self._live.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[pb.DecodeStreamRequest]) -> None:
        try:
            async for message in requests:
                op = message.WhichOneof("op")
                if op == "start":
                    self._start(message)
                elif op == "cancel":
                    task = self._live.get(message.cancel)
                    if task is not None:
                        task.cancel()
        finally:
            self._reading = False
            self._ready.set()

    def _start(self, message: pb.DecodeStreamRequest) -> None:
        request = message.start
        rid = request.request_id
        if not rid:
            self._error(rid, grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
            return
        if rid in self._live:
            self._error(rid, grpc.StatusCode.INVALID_ARGUMENT, f"request {rid} is already live on this stream")
            return
        timeout = message.timeout_s if message.timeout_s > 0 else None
        task = asyncio.create_task(self._run_one(request, dict(message.metadata), timeout), name=f"decode-{rid}")
        self._live[rid] = task

    async def _run_one(self, request: pb.DecodeRequest, metadata: dict[str, str], timeout: float | None) -> None:
        rid = request.request_id
        try:
            def emit() -> pb.DecodeResponse:
                """A new event of this request in the outbox: its response, to fill in place."""
                event = pb.DecodeStreamEvent(request_id=rid)
                self._event(event)
                return event.response

            context = RequestContext(metadata)
            # DecodeService writes its tokens into what `emit` returns; a service with only
            # Generate (the test doubles, the bench's stubs) yields them all.
            generate = getattr(self._service, "generate", None)
            responses = generate(request, context, emit) if generate else self._service.Generate(request, context)
            async with asyncio.timeout(timeout):
                async for response in responses:
                    emit().CopyFrom(response)
        except RequestAborted as exc:
            self._error(rid, exc.code, exc.details)
        except TimeoutError:
            self._error(rid, grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        except asyncio.CancelledError:
            raise  # cancelled by the router: it expects nothing more
        except Exception as exc:  # noqa: BLE001 - one request's failure must not end the others
            logger.exception("request %s failed", rid)
            self._error(rid, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            if self._live.get(rid) is asyncio.current_task():
                del self._live[rid]
                self._ready.set()  # the writer may be waiting for the last request

    def _event(self, event: pb.DecodeStreamEvent) -> None:
        self._outbox.append(event)
        self._ready.set()

    def _error(self, rid: str, code: grpc.StatusCode, details: str) -> None:
        self._event(pb.DecodeStreamEvent(request_id=rid, error_code=status_codes.to_wire(code), error=details))

    async def _write(self) -> None:
        context = self._context
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self._outbox:
                batch, self._outbox = self._outbox, []
                await context.write(pb.DecodeStreamBatch(events=batch))
            elif not self._reading and not self._live:
                return  # the router is done sending and every request has ended


async def serve_stream(service: pb_grpc.DecodeWorkerServicer, requests: AsyncIterator[pb.DecodeStreamRequest],
                       context: grpc.aio.ServicerContext) -> None:
    await context.send_initial_metadata(())  # the router writes only once the stream is taken
    await MuxSession(service, context).run(requests)
