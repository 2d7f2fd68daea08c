"""Sender end of a one-sided backend's control connection."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import EndpointDescriptor, PeerDisconnectedError, RoomReservation
from .control_peer import ControlPeer
from .control_wire import FrameSocket, ProtocolError, decode_status, status_error
from .onesided_wire import ControlFrame, decode_reservation


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


class OneSidedPeer(ControlPeer[PendingWrite]):
    """One control connection plus the engine target of one receiver; shared by
    every write to it. ``target`` is released through ``release_target`` once
    the connection is gone and no write uses it any more."""

    def __init__(self, descriptor: EndpointDescriptor, fsock: FrameSocket,
                 target: object, release_target: Callable[[object], None]) -> None:
        self.target = target
        self._release_target = release_target
        self._target_released = False
        self._active_writes = 0  # opened and not ended: they may use ``target``
        super().__init__(descriptor, fsock)

    @property
    def max_pages(self) -> int:
        return sum(r.num_pages for r in self.descriptor.regions)

    # -- writes
    def _new_pending(self) -> PendingWrite:
        return PendingWrite()

    def open_request(self) -> tuple[int, PendingWrite]:
        opened = super().open_request()
        self._active_writes += 1
        return opened

    def end_request(self, req_id: int, *, cancel: bool) -> None:
        """The write is over (``cancel``: it gave up, tell the receiver)."""
        self._pending.pop(req_id, None)
        self._active_writes -= 1
        if cancel:
            self._send_cancel(req_id)
        self._maybe_release_target()

    def broken(self, reason: str) -> None:
        """The data path failed: drop the connection so that callers reconnect
        (a new handshake refreshes the engine target)."""
        self._fail_all(PeerDisconnectedError(
            f"transfer to {self.descriptor.address} failed: {reason}"))

    # -- replies
    def _on_reply(self, ftype: enum.IntEnum, req_id: int, body: bytes) -> None:
        if ftype is ControlFrame.GO:
            self._on_go(req_id, body)
        elif ftype is ControlFrame.ACK:
            self._on_ack(req_id, body)
        else:
            raise ProtocolError(f"unexpected {ftype.name} frame from a receiver")

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

    def _fail(self, pending: PendingWrite, error: PeerDisconnectedError) -> None:
        pending.fail(error)

    def _fail_all(self, error: PeerDisconnectedError) -> None:
        super()._fail_all(error)
        self._maybe_release_target()

    def _maybe_release_target(self) -> None:
        if not self.connected and self._active_writes == 0 and not self._target_released:
            self._target_released = True
            self._release_target(self.target)
