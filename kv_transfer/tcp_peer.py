"""Sender end of a ``tcp`` connection: sends frames, matches ACKs to writes."""

from __future__ import annotations

import asyncio

from .base import EndpointDescriptor, PeerDisconnectedError, PeerHandle
from .tcp_wire import (MALFORMED, ConnectionClosed, FrameSocket, FrameType,
                       ProtocolError, Status, decode_status, status_error)


class TcpPeer(PeerHandle):
    """Client end of one connection; shared by every write to that peer."""

    def __init__(self, descriptor: EndpointDescriptor, fsock: FrameSocket) -> None:
        self.descriptor = descriptor
        self._sock = fsock
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._next_req = 0
        self.reader = asyncio.create_task(self._read_acks())
        self._cancels: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return not self._sock.closed

    def open_request(self) -> tuple[int, asyncio.Future[None]]:
        if not self.connected:
            raise PeerDisconnectedError(f"not connected to {self.descriptor.address}")
        self._next_req = (self._next_req + 1) % (1 << 32)
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next_req] = fut
        return self._next_req, fut

    def drop_request(self, req_id: int) -> None:
        """The write gave up: forget its ACK and tell the receiver to drop it."""
        fut = self._pending.pop(req_id, None)
        if fut is not None and fut.done() and not fut.cancelled():
            fut.exception()  # retrieved: the caller already raised its own error
        if self.connected:
            task = asyncio.create_task(self.send(FrameType.CANCEL, req_id))
            self._cancels.add(task)
            task.add_done_callback(self._cancel_done)

    def _cancel_done(self, task: asyncio.Task[None]) -> None:
        self._cancels.discard(task)
        if not task.cancelled():
            task.exception()

    async def send(self, ftype: FrameType, req_id: int,
                   body: bytes | memoryview = b"") -> None:
        try:
            await self._sock.send_frame(ftype, req_id, body)
        except ConnectionClosed as exc:
            raise PeerDisconnectedError(
                f"connection to {self.descriptor.address} lost: {exc}") from None

    async def _read_acks(self) -> None:
        reason = "closed"
        try:
            while True:
                ftype, req_id, length = await self._sock.recv_header()
                body = await self._sock.recv_body(length)
                if ftype is not FrameType.ACK:
                    raise ProtocolError(f"unexpected {ftype.name} frame from server")
                self._resolve(req_id, *decode_status(body))
        except (ConnectionClosed, *MALFORMED) as exc:
            reason = str(exc)
        finally:
            self._fail_all(PeerDisconnectedError(
                f"connection to {self.descriptor.address} lost: {reason}"))
            await self._sock.aclose()

    def _resolve(self, req_id: int, status: Status, text: str) -> None:
        fut = self._pending.pop(req_id, None)
        if fut is None or fut.done():
            return  # the write already gave up (timeout/cancel)
        error = status_error(status, text)
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    def _fail_all(self, error: PeerDisconnectedError) -> None:
        self._sock.shutdown()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)
                fut.add_done_callback(lambda f: f.exception())

    async def close(self) -> None:
        self._sock.shutdown()
        await asyncio.gather(self.reader, return_exceptions=True)


