"""The router's end of DecodeWorker.Stream: every request to one decode worker over one
long-lived stream (epd.proto), instead of a Generate call each.

`DecodeMux.generate` returns a call with the part of grpc.aio.UnaryStreamCall the
dispatcher uses: `read()` gives the request's DecodeResponse messages in order, then
grpc.aio.EOF, or raises grpc.aio.AioRpcError with the code Generate would have ended
with; `cancel()` stops it (the worker is told, and a pending read raises CANCELLED).
One reader task takes the worker's batches and hands each event to its request; one
writer task sends starts and cancels in order (a gRPC stream takes one write at a time).

When the stream fails (the worker died, its channel closed, it refused the stream),
every request on it fails as its own Generate call would have: UNAVAILABLE for a broken
stream, the refusal's code otherwise; the next request opens a new stream. A worker
that does not know the method (UNIMPLEMENTED: an older worker, or a stand-in) gets
plain Generate calls from then on, the requests caught by the refusal included.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Sequence

import grpc

from proto import epd_pb2 as pb
from proto import status_codes

log = logging.getLogger("router.decode_mux")


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Stream:
    """One DecodeWorker.Stream call and the requests started on it."""

    def __init__(self, mux: DecodeMux) -> None:
        self.mux = mux
        self.calls: dict[str, MuxCall] = {}
        self._up: deque[pb.DecodeStreamRequest] = deque()
        self._wake = asyncio.Event()
        self._call = mux.stub.Stream(metadata=mux.metadata)
        self._reader = asyncio.create_task(self._read(), name=f"decode-mux-read-{mux.worker_id}")
        self._writer = asyncio.create_task(self._write(), name=f"decode-mux-write-{mux.worker_id}")

    def send(self, message: pb.DecodeStreamRequest) -> None:
        self._up.append(message)
        self._wake.set()

    async def _write(self) -> None:
        try:
            # Nothing is written before the worker has taken the stream (it answers with its
            # headers first): a write racing a refusal would replace the refusal's status
            # (UNIMPLEMENTED, UNAUTHENTICATED) with an INTERNAL error on the reader's side.
            await self._call.initial_metadata()
            if self._call.done():
                return
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._up:
                    await self._call.write(self._up.popleft())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the reader sees the same failure and ends the stream
            log.debug("decode stream to %s: write failed: %s", self.mux.worker_id, exc)

    async def _read(self) -> None:
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, f"the stream to decode worker {self.mux.worker_id} ended")
        try:
            while True:
                batch = await self._call.read()
                if batch is grpc.aio.EOF:
                    break
                calls = self.calls
                for event in batch.events:
                    call = calls.get(event.request_id)
                    if call is not None:
                        call._deliver(event)
        except asyncio.CancelledError:
            # Our own close, or the channel closed under the call.
            self._fail(rpc_error(grpc.StatusCode.UNAVAILABLE,
                                 f"the stream to decode worker {self.mux.worker_id} was cancelled (its channel closed)"))
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return
        except grpc.aio.AioRpcError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - e.g. a batch that does not parse: end the stream, loudly
            log.warning("decode stream to %s failed: %s", self.mux.worker_id, exc)
            error = rpc_error(grpc.StatusCode.INTERNAL, f"decode stream to {self.mux.worker_id}: {exc}")
        self._fail(error)

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        if self.mux._stream is self:
            self.mux._stream = None
        self._writer.cancel()
        self._call.cancel()
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call._stream_failed(error)

    def close(self) -> None:
        self._reader.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)


class MuxCall:
    """One request on a decode stream, read like a Generate call."""

    def __init__(self, mux: DecodeMux, request: pb.DecodeRequest, timeout: float | None,
                 metadata: Sequence[tuple[str, str]]) -> None:
        self._mux = mux
        self._request = request
        self._metadata = tuple(metadata)
        self._loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else self._loop.time() + timeout
        self._events: deque[pb.DecodeStreamEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: grpc.aio.AioRpcError | None = None
        self._ended = False  # finished, failed or cancelled: nothing more is read from the stream
        self._eof = False
        self._got_event = False
        self._direct: grpc.aio.UnaryStreamCall | None = None
        self._timer = None if timeout is None else self._loop.call_at(self._deadline, self._expire)
        self._stream: _Stream | None = None
        self._start()

    def _start(self) -> None:
        if not self._mux.supported or self._mux.closed:  # (closed: the worker left; the call fails there)
            self._go_direct()
            return
        stream = self._mux._open()
        rid = self._request.request_id
        if rid in stream.calls:  # the worker would refuse it; say so the same way
            self._fail(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid} is already live on this stream"))
            return
        self._stream = stream
        stream.calls[rid] = self
        stream.send(pb.DecodeStreamRequest(start=self._request, metadata=dict(self._metadata),
                                           timeout_s=self._remaining() or 0.0))  # 0: no deadline

    def _remaining(self) -> float | None:
        """Seconds left until the deadline (at least 1 ms); None: no deadline."""
        return None if self._deadline is None else max(1e-3, self._deadline - self._loop.time())

    def _go_direct(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._direct = self._mux.stub.Generate(self._request, timeout=self._remaining(),
                                               metadata=self._metadata or None)
        self._wake()

    # -- from the stream ---------------------------------------------------------------

    def _deliver(self, event: pb.DecodeStreamEvent) -> None:
        self._got_event = True
        self._events.append(event)
        if event.error_code or event.response.WhichOneof("event") == "finished":
            self._detach()
        self._wake()

    def _stream_failed(self, error: grpc.aio.AioRpcError) -> None:
        self._stream = None
        if error.code() == grpc.StatusCode.UNIMPLEMENTED and not self._got_event and not self._ended:
            if self._mux.supported:
                log.info("decode worker %s has no Stream method: plain Generate calls from now on",
                         self._mux.worker_id)
            self._mux.supported = False
            self._go_direct()
            return
        self._fail(error)

    # -- the call's interface ------------------------------------------------------------

    async def read(self) -> Any:
        while True:
            if self._direct is not None:
                return await self._direct.read()
            if self._events:
                event = self._events.popleft()
                if event.error_code:
                    self._eof = True
                    raise rpc_error(status_codes.from_wire(event.error_code), event.error)
                if event.response.WhichOneof("event") == "finished":
                    self._eof = True
                return event.response
            if self._eof:
                return grpc.aio.EOF
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def cancel(self) -> bool:
        if self._direct is not None:
            return self._direct.cancel()
        if self._ended:
            return False
        self._send_cancel()
        self._fail(rpc_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!"))
        return True

    # -- internals -------------------------------------------------------------------------

    def _expire(self) -> None:
        self._timer = None
        if self._direct is None and not self._ended:
            self._send_cancel()
            self._fail(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _send_cancel(self) -> None:
        stream = self._stream
        if stream is not None and stream.calls.get(self._request.request_id) is self:
            stream.send(pb.DecodeStreamRequest(cancel=self._request.request_id))

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        if self._ended:
            return
        self._error = error
        self._events.clear()
        self._detach()
        self._wake()

    def _detach(self) -> None:
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        stream, self._stream = self._stream, None
        if stream is not None and stream.calls.get(self._request.request_id) is self:
            del stream.calls[self._request.request_id]

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class DecodeMux:
    """The stream to one decode worker, opened on first use and again after a failure."""

    def __init__(self, stub: Any, worker_id: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.stub = stub
        self.worker_id = worker_id
        self.metadata = tuple(metadata) or None
        self.supported = True
        self.closed = False
        self._stream: _Stream | None = None

    def generate(self, request: pb.DecodeRequest, timeout: float | None = None,
                 metadata: Sequence[tuple[str, str]] = ()) -> MuxCall:
        return MuxCall(self, request, timeout, metadata)

    @property
    def live_requests(self) -> int:
        return len(self._stream.calls) if self._stream is not None else 0

    def _open(self) -> _Stream:
        if self._stream is None:
            self._stream = _Stream(self)
        return self._stream

    def retire(self) -> None:
        """The worker left the registry: no new requests here; the running ones end
        with the channel (which may give them a grace period)."""
        self.closed = True

    def close(self) -> None:
        """Ends the stream now; its requests fail with UNAVAILABLE."""
        self.closed = True
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    async def aclose(self) -> None:
        """`close`, then wait until the stream's tasks have ended."""
        stream = self._stream
        self.close()
        if stream is not None:
            await stream.wait_closed()
