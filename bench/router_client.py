"""The router benchmark's client: streamed chat completions over raw keep-alive
HTTP/1.1 connections (asyncio protocols, so the client costs little CPU and the same
for either router), and closed-loop load at a fixed concurrency.

A response is complete at the chunked encoding's last chunk; it must have status 200
and end with `data: [DONE]`. `check` parses the SSE events and compares the streamed
text with what was expected.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Callable, Protocol
from urllib.parse import urlsplit

_TERMINAL = b"\r\n0\r\n\r\n"
CONNECT_TIMEOUT_S = 5.0


class BenchError(Exception):
    """A response that was not a complete, correct stream."""


class _StreamProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._done: asyncio.Future[bytes] | None = None
        self._lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._done is not None and not self._done.done() and self._complete():
            body, self._buffer = bytes(self._buffer), bytearray()
            self._done.set_result(body)

    def _complete(self) -> bool:
        buffer = self._buffer
        if buffer.endswith(_TERMINAL):
            return True
        head = buffer.find(b"\r\n\r\n")
        if head < 0 or b"chunked" in buffer[:head].lower():
            return False
        length = next((int(line.split(b":", 1)[1]) for line in bytes(buffer[:head]).split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        return len(buffer) >= head + 4 + length

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("the server closed the connection")
        if self._done is not None and not self._done.done():
            self._done.set_exception(self._lost)

    def exchange(self, request: bytes) -> asyncio.Future[bytes]:
        if self._lost is not None:
            raise BenchError(f"connection lost: {self._lost}")
        assert self.transport is not None
        self._done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._done


class StreamClient:
    """One keep-alive connection; `post` sends a JSON body and returns the raw response."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
        self._protocol: _StreamProtocol | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, protocol = await loop.create_connection(_StreamProtocol, self.host, self.port)
        self._protocol = protocol

    def request_bytes(self, body: bytes) -> bytes:
        return (b"POST %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
                b"accept: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                % (self.path.encode(), self.host.encode(), self.port, len(body), body))

    async def post(self, request: bytes, timeout: float) -> bytes:
        if self._protocol is None:
            await self.connect()
        assert self._protocol is not None
        # Not asyncio.wait_for: on 3.11 it swallows a cancellation that arrives in the
        # turn the response completes, and a load caller then never stops.
        async with asyncio.timeout(timeout):
            return await self._protocol.exchange(request)

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


def check(response: bytes, expected_text: str) -> None:
    """Raise BenchError unless `response` is a 200 SSE stream of `expected_text`."""
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if b" " in head else b"?"
    if status != b"200":
        raise BenchError(f"status {status.decode()}: {body[:300]!r}")
    text, done = [], False
    for line in _unchunk(body).split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            done = True
            continue
        for choice in json.loads(data).get("choices", []):
            text.append((choice.get("delta") or {}).get("content") or "")
    if not done:
        raise BenchError("the stream did not end with data: [DONE]")
    if "".join(text) != expected_text:
        raise BenchError(f"streamed text {''.join(text)!r} != expected {expected_text!r}")


def _unchunk(body: bytes) -> bytes:
    out, position = bytearray(), 0
    while True:
        end = body.index(b"\r\n", position)
        size = int(body[position:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        position = end + 2 + size + 2


@dataclass
class LoadResult:
    completed: int
    seconds: float
    latencies: list[float]  # seconds, one per completed request in the window

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


class Caller(Protocol):
    """Issues one request per call (on its own connection); `close` drops the connection."""

    async def __call__(self) -> None: ...

    def close(self) -> None: ...


async def closed_loop(make_caller: Callable[[], Caller], concurrency: int, warmup_s: float, measure_s: float,
                      on_window: Callable[[bool], None] = lambda start: None) -> LoadResult:
    """`concurrency` callers issue requests back to back; requests that end inside the
    measuring window (after `warmup_s`, for `measure_s`) count, and `on_window(True)` /
    `on_window(False)` run at its edges (CPU readings). The window's end waits for nobody."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    window = (start + warmup_s, start + warmup_s + measure_s)
    latencies: list[float] = []
    callers = [make_caller() for _ in range(concurrency)]
    stopping = False

    async def run(caller: Caller) -> None:
        while not stopping:
            began = time.perf_counter()
            await caller()
            if window[0] <= loop.time() < window[1]:
                latencies.append(time.perf_counter() - began)

    loop.call_at(window[0], on_window, True)
    loop.call_at(window[1], on_window, False)
    tasks = [asyncio.create_task(run(c)) for c in callers]
    try:
        await asyncio.wait(tasks, timeout=warmup_s + measure_s, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t.exception() for t in tasks if t.done() and t.exception() is not None), None)
        if failed is not None:
            raise failed
    finally:
        stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for caller in callers:
            caller.close()  # a cancelled request leaves its connection mid-response
    return LoadResult(len(latencies), measure_s, latencies)
