"""Sender end of a one-sided backend's control connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import EndpointDescriptor, PeerDisconnectedError, PeerHandle, RoomReservation
from .onesided_wire import ControlFrame, ControlSocket, decode_reservation
from .tcp_wire import MALFORMED, ConnectionClosed, ProtocolError, decode_status, status_error


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark retrieved: the write reports its own error


@dataclass(eq=False)
class PendingWrite:
    """Replies the receiver owes one write: GO (reservation), then the ACK."""

    go: asyncio.Future[RoomReservation] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    ack: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    def __post_init__(self) -> None:
        self.go.add_done_callback(_retrieve)
        self.ack.add_done_callback(_retrieve)

    def fail(self, error: Exception) -> None:
        for fut in (self.go, self.ack):
            if not fut.done():
                fut.set_exception(error)


class OneSidedPeer(PeerHandle):
    """One control connection plus the engine target of one receiver; shared by
    every write to it. ``target`` is released through ``release_target`` once
    the connection is gone and no write uses it any more."""

    def __init__(self, descriptor: EndpointDescriptor, sock: ControlSocket,
                 target: object, release_target: Callable[[object], None]) -> None:
        self.descriptor = descriptor
        self.target = target
        self._sock = sock
        self._release_target = release_target
        self._target_released = False
        self._pending: dict[int, PendingWrite] = {}
        self._next_req = 0
        self._active_writes = 0
        self._cancels: set[asyncio.Task[None]] = set()
        self.reader = asyncio.create_task(self._read_replies())

    @property
    def connected(self) -> bool:
        return not self._sock.closed

    @property
    def max_pages(self) -> int:
        return sum(r.num_pages for r in self.descriptor.regions)

    # -- writes
    def open_request(self) -> tuple[int, PendingWrite]:
        if not self.connected:
            raise PeerDisconnectedError(f"not connected to {self.descriptor.address}")
        self._next_req = (self._next_req + 1) % (1 << 32)
        pending = PendingWrite()
        self._pending[self._next_req] = pending
        self._active_writes += 1
        return self._next_req, pending

    def end_request(self, req_id: int, *, cancel: bool) -> None:
        """The write is over (``cancel``: it gave up, tell the receiver)."""
        self._pending.pop(req_id, None)
        self._active_writes -= 1
        if cancel and self.connected:
            task = asyncio.create_task(self.send(ControlFrame.CANCEL, req_id))
            self._cancels.add(task)
            task.add_done_callback(self._cancel_sent)
        self._maybe_release_target()

    def _cancel_sent(self, task: asyncio.Task[None]) -> None:
        self._cancels.discard(task)
        if not task.cancelled():
            task.exception()

    async def send(self, ftype: ControlFrame, req_id: int, body: bytes = b"") -> None:
        try:
            await self._sock.send_control(ftype, req_id, body)
        except ConnectionClosed as exc:
            raise PeerDisconnectedError(
                f"connection to {self.descriptor.address} lost: {exc}") from None

    def broken(self, reason: str) -> None:
        """The data path failed: drop the connection so that callers reconnect
        (a new handshake refreshes the engine target)."""
        self._fail_all(PeerDisconnectedError(
            f"transfer to {self.descriptor.address} failed: {reason}"))

    # -- replies
    async def _read_replies(self) -> None:
        reason = "closed"
        try:
            while True:
                ftype, req_id, body = await self._sock.recv_control()
                if ftype is ControlFrame.GO:
                    self._on_go(req_id, body)
                elif ftype is ControlFrame.ACK:
                    self._on_ack(req_id, body)
                else:
                    raise ProtocolError(f"unexpected {ftype.name} frame from a receiver")
        except (ConnectionClosed, *MALFORMED) as exc:
            reason = str(exc)
        finally:
            self._fail_all(PeerDisconnectedError(
                f"connection to {self.descriptor.address} lost: {reason}"))
            await self._sock.aclose()

    def _on_go(self, req_id: int, body: bytes) -> None:
        reservation = decode_reservation(body, self.max_pages)
        pending = self._pending.get(req_id)
        if pending is not None and not pending.go.done():
            pending.go.set_result(reservation)

    def _on_ack(self, req_id: int, body: bytes) -> None:
        status, text = decode_status(body)
        pending = self._pending.get(req_id)
        if pending is None:
            return  # the write already gave up (timeout/cancel)
        error = status_error(status, text)
        if error is not None:
            pending.fail(error)
        elif not pending.ack.done():
            pending.go.cancel()  # a write without bytes is never sent GO
            pending.ack.set_result(None)

    def _fail_all(self, error: PeerDisconnectedError) -> None:
        self._sock.shutdown()
        for pending in self._pending.values():
            pending.fail(error)
        self._maybe_release_target()

    def _maybe_release_target(self) -> None:
        if not self.connected and self._active_writes == 0 and not self._target_released:
            self._target_released = True
            self._release_target(self.target)

    async def close(self) -> None:
        self._sock.shutdown()
        await asyncio.gather(self.reader, return_exceptions=True)
