"""Sender end of a control connection, shared by the tcp and one-sided backends.

A ``ControlPeer`` is the one connection to a receiver that every write to it
shares: it numbers writes (req_id), keeps what each write waits on until the
receiver answers, and fails all of them with ``PeerDisconnectedError`` as soon
as the connection is lost. The subclass says what a write waits on and how
the receiver's replies resolve it.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from typing import Generic, TypeVar

from .base import EndpointDescriptor, PeerDisconnectedError, PeerHandle
from .control_wire import MALFORMED, ConnectionClosed, FrameSocket

PendingT = TypeVar("PendingT")  # what one write waits on (futures of its replies)


class ControlPeer(PeerHandle, Generic[PendingT]):
    """Client end of one control connection; shared by every write to that peer."""

    def __init__(self, descriptor: EndpointDescriptor, fsock: FrameSocket) -> None:
        self.descriptor = descriptor
        self._sock = fsock
        self._pending: dict[int, PendingT] = {}  # by req_id, until the write ends
        self._next_req = 0
        self._cancels: set[asyncio.Task[None]] = set()
        self.reader = asyncio.create_task(self._read_replies())

    @property
    def connected(self) -> bool:
        return not self._sock.closed

    @property
    def socket(self) -> FrameSocket:
        """The connection's frame socket (fault injection, kv_transfer/faults.py)."""
        return self._sock

    def open_request(self) -> tuple[int, PendingT]:
        """A new req_id and what its write waits on."""
        if not self.connected:
            raise PeerDisconnectedError(f"not connected to {self.descriptor.address}")
        self._next_req = (self._next_req + 1) % (1 << 32)
        pending = self._new_pending()
        self._pending[self._next_req] = pending
        return self._next_req, pending

    def _send_cancel(self, req_id: int) -> None:
        """Tell the receiver (if still connected) that the write gave up."""
        if self.connected:
            task = asyncio.create_task(self.send(self._sock.protocol.cancel, req_id))
            self._cancels.add(task)
            task.add_done_callback(self._cancel_sent)

    def _cancel_sent(self, task: asyncio.Task[None]) -> None:
        self._cancels.discard(task)
        if not task.cancelled():
            task.exception()

    async def send(self, ftype: enum.IntEnum, req_id: int,
                   body: bytes | memoryview = b"") -> None:
        try:
            await self._sock.send_frame(ftype, req_id, body)
        except ConnectionClosed as exc:
            raise PeerDisconnectedError(
                f"connection to {self.descriptor.address} lost: {exc}") from None

    async def _read_replies(self) -> None:
        reason = "closed"
        try:
            while True:
                ftype, req_id, body = await self._sock.recv_frame()
                self._on_reply(ftype, req_id, body)
        except (ConnectionClosed, *MALFORMED) as exc:
            reason = str(exc)
        finally:
            self._fail_all(PeerDisconnectedError(
                f"connection to {self.descriptor.address} lost: {reason}"))
            await self._sock.aclose()

    def _fail_all(self, error: PeerDisconnectedError) -> None:
        self._sock.shutdown()
        pending, self._pending = self._pending, {}
        for waiting in pending.values():
            self._fail(waiting, error)

    async def close(self) -> None:
        self._sock.shutdown()
        await asyncio.gather(self.reader, return_exceptions=True)

    @abc.abstractmethod
    def _new_pending(self) -> PendingT:
        """What a new write waits on (created on the event loop)."""

    @abc.abstractmethod
    def _on_reply(self, ftype: enum.IntEnum, req_id: int, body: bytes) -> None:
        """Resolve the write ``req_id`` names; ``ProtocolError`` on a frame a
        receiver must not send (the connection is then dropped)."""

    @abc.abstractmethod
    def _fail(self, pending: PendingT, error: PeerDisconnectedError) -> None:
        """The connection is lost: fail whatever the write still waits on."""
