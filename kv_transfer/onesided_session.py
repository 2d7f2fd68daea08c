"""Receiver end of the one-sided backends' control connections.

Invariants:

* a write is admitted (``RoomTable.admit``: room live, generation current, every
  destination page reserved, seq unclaimed) before the receiver answers GO, and
  the sender posts no byte before GO;
* its notification is delivered only through ``WriteTicket.finish``, which
  re-checks that the room and generation are still live: a write that outlived
  its room is answered FENCED, never delivered;
* ``release_room`` answers every in-flight write of the room FENCED at once, so
  the sender stops after the slice it is posting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import FencingError, Notification, RegionSpec, TransferError
from .onesided_wire import (PROTOCOL_VERSION, ControlFrame, ControlSocket, Hello,
                            HelloReply, decode_progress, encode_reservation)
from .rooms import RoomTable, WriteTicket
from .tcp_wire import MALFORMED, Begin, ConnectionClosed, ProtocolError, encode_status, status_of

log = logging.getLogger(__name__)

InbandKey = tuple[str, int, int]  # (room_id, generation, seq): one admitted write


@dataclass(frozen=True)
class ControlContext:
    """What sessions share with their backend, which owns every field."""

    backend_name: str
    compat_hash: str
    handshake_timeout: float
    regions: Mapping[str, RegionSpec]
    rooms: RoomTable
    local_info: Callable[[Mapping[str, Any]], dict[str, Any]]  # engine info for a sender
    count_received: Callable[[int], None]
    inband: InbandWrites | None  # set for engines with in-band notifications


@dataclass(eq=False)
class InboundWrite:
    ticket: WriteTicket
    total: int  # bytes of the whole write
    landed: int = 0  # bytes reported landed so far (counted into the backend)

    @property
    def key(self) -> InbandKey:
        note = self.ticket.notification
        return note.room_id, note.generation, note.seq


@dataclass
class InbandWrites:
    """Admitted writes waiting for their engine notification (NIXL), by key.

    ``active`` is set while the engine must be polled: some write awaits its
    notification, or an aborted write may still have a slice in flight (until
    its sender says CANCEL or goes away). Engines without a progress thread
    (NIXL over UCX TCP) only move bytes while they are polled."""

    waiting: dict[InbandKey, tuple[ControlSession, int]] = field(default_factory=dict)
    draining: set[tuple[ControlSession, int]] = field(default_factory=set)
    active: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, key: InbandKey, session: ControlSession, req_id: int) -> None:
        self.waiting[key] = (session, req_id)
        self.active.set()

    def discard(self, key: InbandKey) -> None:
        self.waiting.pop(key, None)
        self._update()

    def drain(self, session: ControlSession, req_id: int) -> None:
        self.draining.add((session, req_id))
        self.active.set()

    def drained(self, session: ControlSession, req_id: int | None = None) -> None:
        """The sender stopped posting ``req_id`` (None: every request of the session)."""
        self.draining = {(s, r) for s, r in self.draining
                         if s is not session or (req_id is not None and r != req_id)}
        self._update()

    def _update(self) -> None:
        if not self.waiting and not self.draining:
            self.active.clear()

    def deliver(self, sender_id: str, message: bytes) -> None:
        """An engine notification arrived: finish the write it names, if it is
        still admitted and came from the sender that opened it."""
        try:
            note = Notification.decode(message)
        except (ValueError, UnicodeDecodeError):
            log.warning("dropping malformed engine notification from %s", sender_id)
            return
        entry = self.waiting.get((note.room_id, note.generation, note.seq))
        if entry is None or entry[0].sender_id != sender_id:
            log.debug("dropping engine notification %s from %s: no such write",
                      note, sender_id)
            return
        session, req_id = entry
        session.finish(req_id)


class ControlSession:
    """Server end of one control connection: admits, tracks and ACKs writes."""

    def __init__(self, ctx: ControlContext, sock: ControlSocket) -> None:
        self._ctx = ctx
        self._sock = sock
        self._writes: dict[int, InboundWrite] = {}
        self._replies: set[asyncio.Task[None]] = set()
        self.sender_id = ""  # the sender engine's identity (NIXL agent name)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            if await self._handshake():
                await self._serve()
        except (ConnectionClosed, asyncio.TimeoutError, *MALFORMED) as exc:
            log.debug("control session ended: %s", exc)
        finally:
            self._sock.shutdown()
            for write in self._writes.values():
                self._forget_inband(write)
            self._writes.clear()
            if self._ctx.inband is not None:
                self._ctx.inband.drained(self)
            self._ctx.rooms.writer_lost(self)
            await self._sock.aclose()

    async def _handshake(self) -> bool:
        ftype, _, body = await asyncio.wait_for(self._sock.recv_control(),
                                                self._ctx.handshake_timeout)
        if ftype is not ControlFrame.HELLO:
            raise ProtocolError(f"expected HELLO, got {ftype.name}")
        hello = Hello.decode(body)
        ok = (hello.version == PROTOCOL_VERSION
              and hello.backend == self._ctx.backend_name
              and hello.compat_hash == self._ctx.compat_hash)
        info = self._ctx.local_info(hello.info) if ok else {}
        sender = hello.info.get("id", "")
        self.sender_id = sender if isinstance(sender, str) else ""
        reply = HelloReply(ok, self._ctx.compat_hash, info)
        await self._sock.send_control(ControlFrame.HELLO_REPLY, 0, reply.encode())
        return ok

    async def _serve(self) -> None:
        while True:
            ftype, req_id, body = await self._sock.recv_control()
            if ftype is ControlFrame.BEGIN:
                await self._on_begin(req_id, body)
            elif ftype is ControlFrame.PROGRESS:
                self._on_progress(req_id, decode_progress(body))
            elif ftype is ControlFrame.DONE and not body:
                self.finish(req_id)
            elif ftype is ControlFrame.CANCEL and not body:
                self._on_cancel(req_id)
            else:
                raise ProtocolError(f"unexpected {ftype.name} frame from a sender")

    async def _on_begin(self, req_id: int, body: bytes) -> None:
        begin = Begin.decode(body)
        if req_id in self._writes:
            raise ProtocolError(f"request {req_id} opened twice")
        region = self._ctx.regions.get(begin.region)
        try:
            if region is None:
                raise FencingError(f"no region {begin.region!r} on this endpoint")
            ticket = self._ctx.rooms.admit(
                begin.notification, begin.region, begin.runs, writer=self,
                on_abort=lambda error: self._abort(req_id, error))
        except TransferError as exc:
            await self._reply(req_id, exc)
            return
        total = sum(r.num_pages for r in begin.runs) * region.page_bytes
        write = InboundWrite(ticket, total)
        self._writes[req_id] = write
        if total == 0:  # notification only: nothing will be posted
            self.finish(req_id)
            return
        if self._ctx.inband is not None:
            self._ctx.inband.add(write.key, self, req_id)
        reservation = self._ctx.rooms.reservation(begin.notification.room_id)
        await self._send(ControlFrame.GO, req_id, encode_reservation(reservation))

    def _on_progress(self, req_id: int, nbytes: int) -> None:
        write = self._writes.get(req_id)  # None: aborted, finished or unknown
        if write is not None and write.ticket.live:
            self._count(write, min(nbytes, write.total - write.landed))

    def finish(self, req_id: int) -> None:
        """Every byte of the write has landed: deliver its notification (after
        ``finish`` re-checked room and generation) and ACK the outcome."""
        write = self._writes.pop(req_id, None)
        if write is None:
            return  # aborted earlier: the sender already got FENCED
        self._forget_inband(write)
        error: TransferError | None = None
        try:
            write.ticket.finish(self._ctx.rooms)
            self._count(write, write.total - write.landed)
        except TransferError as exc:
            error = exc
        self._reply_soon(req_id, error)

    def _on_cancel(self, req_id: int) -> None:
        if self._ctx.inband is not None:
            self._ctx.inband.drained(self, req_id)
        write = self._writes.pop(req_id, None)
        if write is not None:
            self._forget_inband(write)
            write.ticket.abandon()

    def _abort(self, req_id: int, error: TransferError) -> None:
        """The room was released/replaced/failed while the write was in flight."""
        write = self._writes.pop(req_id, None)
        if write is None:
            return
        self._forget_inband(write)
        if self._ctx.inband is not None and write.total:
            self._ctx.inband.drain(self, req_id)  # its slice may still be moving
        self._reply_soon(req_id, error)

    def _count(self, write: InboundWrite, nbytes: int) -> None:
        write.landed += nbytes
        self._ctx.count_received(nbytes)

    def _forget_inband(self, write: InboundWrite) -> None:
        if self._ctx.inband is not None:
            self._ctx.inband.discard(write.key)

    def _reply_soon(self, req_id: int, error: TransferError | None) -> None:
        if self._sock.closed:
            return
        task = asyncio.create_task(self._reply(req_id, error))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _reply(self, req_id: int, error: TransferError | None) -> None:
        body = encode_status(status_of(error), str(error) if error else "")
        await self._send(ControlFrame.ACK, req_id, body)

    async def _send(self, ftype: ControlFrame, req_id: int, body: bytes) -> None:
        try:
            await self._sock.send_control(ftype, req_id, body)
        except ConnectionClosed:
            pass  # the reader notices the loss and cleans up

    async def close(self) -> None:
        self._sock.shutdown()
        await asyncio.gather(self.task, return_exceptions=True)
