"""Receiver end of the one-sided backends' control connections.

Invariants:

* a write is admitted (``RoomTable.admit``: room live, generation current, every
  destination page reserved, seq unclaimed) before the receiver answers GO, and
  the sender posts no byte before GO;
* its notification is delivered only through ``WriteTicket.finish``, which
  re-checks that the room and generation are still live: a write that outlived
  its room is answered FENCED, never delivered;
* ``release_room`` answers every in-flight write of the room FENCED at once, so
  the sender posts no further slice;
* until that sender confirms it stopped (CANCEL), loses its connection, or the
  drain timeout passes, no other write into those pages is sent GO
  (``InFlight.drains``): a late slice cannot land on top of a newer room's bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import Notification, TransferError
from .control_session import ControlSession, ReceiverContext
from .control_wire import Begin, FrameSocket, ProtocolError
from .onesided_wire import ControlFrame, Hello, HelloReply, decode_progress, encode_reservation
from .rooms import WriteTicket

log = logging.getLogger(__name__)

InbandKey = tuple[str, int, int]  # (room_id, generation, seq): one admitted write


@dataclass(frozen=True)
class OneSidedContext:
    """What sessions share with a one-sided backend beyond ``ReceiverContext``;
    the backend owns every field."""

    drain_timeout: float  # longest a fenced write's pages stay blocked
    local_info: Callable[[Mapping[str, Any]], dict[str, Any]]  # engine info for a sender
    inflight: InFlight
    inband: bool  # the engine delivers notifications itself (NIXL)


@dataclass(eq=False)
class InboundWrite:
    ticket: WriteTicket
    region: str
    pages: frozenset[int]  # its destination pages
    total: int  # bytes of the whole write
    landed: int = 0  # bytes reported landed so far (counted into the backend)
    go_sent: bool = False  # from then on the sender may be posting bytes

    @property
    def key(self) -> InbandKey:
        note = self.ticket.notification
        return note.room_id, note.generation, note.seq


Drain = tuple["OneSidedSession", int]  # (session, req_id) of a fenced write


@dataclass
class InFlight:
    """The receiver's view of one-sided writes that may still be moving bytes.

    * ``waiting``: admitted writes of in-band engines (NIXL), by notification
      key, until their engine notification arrives.
    * ``drains``: fenced writes that had been sent GO: their sender may still be
      posting its in-flight slices into pages that are no longer theirs. A drain
      ends when the sender says CANCEL (sent once those slices are done or
      abandoned), when its connection is lost, or after the drain timeout.
      Until then a new write into any of those pages is not sent GO, so a late
      slice cannot land on top of the new room's bytes.
    * ``active`` is set while either is non-empty: in-band notifications are
      polled only then (and engines without a progress thread, NIXL with
      ``progress_thread=False``, move bytes only while they are polled).
    """

    waiting: dict[InbandKey, Drain] = field(default_factory=dict)
    drains: dict[Drain, tuple[str, frozenset[int]]] = field(default_factory=dict)
    active: asyncio.Event = field(default_factory=asyncio.Event)
    _change: asyncio.Event = field(default_factory=asyncio.Event)  # set on each drain end

    def expect(self, key: InbandKey, session: OneSidedSession, req_id: int) -> None:
        self.waiting[key] = (session, req_id)
        self.active.set()

    def forget(self, key: InbandKey) -> None:
        self.waiting.pop(key, None)
        self._update()

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

    def drain(self, session: OneSidedSession, req_id: int, region: str,
              pages: frozenset[int], timeout: float) -> None:
        self.drains[(session, req_id)] = (region, pages)
        self.active.set()
        asyncio.get_running_loop().call_later(timeout, self._expire, session, req_id)

    def drained(self, session: OneSidedSession, req_id: int | None = None) -> None:
        """The sender stopped posting ``req_id`` (None: every write of the session)."""
        done = [d for d in self.drains if d[0] is session and req_id in (None, d[1])]
        for drain in done:
            del self.drains[drain]
        if done:
            self._update()
            self._change.set()  # wakes every waiter of this round
            self._change = asyncio.Event()

    def blocked(self, region: str, pages: frozenset[int]) -> bool:
        return any(r == region and not pages.isdisjoint(p) for r, p in self.drains.values())

    async def wait_unblocked(self, region: str, pages: frozenset[int]) -> None:
        while self.blocked(region, pages):
            await self._change.wait()

    def _expire(self, session: OneSidedSession, req_id: int) -> None:
        if (session, req_id) in self.drains:
            log.warning("fenced write %d of %s did not confirm its end: unblocking "
                        "its pages anyway", req_id, session.sender_id or "a sender")
            self.drained(session, req_id)

    def _update(self) -> None:
        if not self.waiting and not self.drains:
            self.active.clear()


class OneSidedSession(ControlSession[InboundWrite]):
    """Server end of one control connection: admits, tracks and ACKs writes."""

    def __init__(self, ctx: ReceiverContext, onesided: OneSidedContext,
                 fsock: FrameSocket) -> None:
        self._onesided = onesided
        self.sender_id = ""  # the sender engine's identity (NIXL agent name)
        super().__init__(ctx, fsock)

    def _connection_lost(self) -> None:
        for write in self._writes.values():
            self._onesided.inflight.forget(write.key)
        self._onesided.inflight.drained(self)  # its engine traffic died with it

    def _answer_hello(self, body: bytes) -> tuple[bool, bytes]:
        hello = Hello.decode(body)
        ok = self._accepts(hello)
        info = self._onesided.local_info(hello.info) if ok else {}
        sender = hello.info.get("id", "")
        self.sender_id = sender if isinstance(sender, str) else ""
        return ok, HelloReply(ok, self._ctx.compat_hash, info).encode()

    async def _serve(self) -> None:
        while True:
            ftype, req_id, body = await self._sock.recv_frame()
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

    async def _admitted(self, req_id: int, begin: Begin, ticket: WriteTicket) -> None:
        page_bytes = self._ctx.regions[begin.region].page_bytes
        pages = frozenset(p for run in begin.runs for p in run.dst_pages)
        total = sum(r.num_pages for r in begin.runs) * page_bytes
        write = InboundWrite(ticket, begin.region, pages, total)
        self._writes[req_id] = write
        if total == 0:  # notification only: nothing will be posted
            self.finish(req_id)
        elif self._onesided.inflight.blocked(write.region, pages):
            self._spawn(self._go_when_drained(req_id, write))
        else:
            await self._go(req_id, write)

    async def _go_when_drained(self, req_id: int, write: InboundWrite) -> None:
        await self._onesided.inflight.wait_unblocked(write.region, write.pages)
        if self._writes.get(req_id) is write:  # not aborted or cancelled meanwhile
            await self._go(req_id, write)

    async def _go(self, req_id: int, write: InboundWrite) -> None:
        if self._onesided.inband:
            self._onesided.inflight.expect(write.key, self, req_id)
        write.go_sent = True
        reservation = self._ctx.rooms.reservation(write.key[0])
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
        self._onesided.inflight.forget(write.key)
        error: TransferError | None = None
        try:
            write.ticket.finish(self._ctx.rooms)
            self._count(write, write.total - write.landed)
        except TransferError as exc:
            error = exc
        self._spawn(self._reply(req_id, error))

    def _on_cancel(self, req_id: int) -> None:
        """The sender gave up on the write and posts nothing more for it."""
        self._onesided.inflight.drained(self, req_id)
        write = self._writes.pop(req_id, None)
        if write is not None:
            self._onesided.inflight.forget(write.key)
            write.ticket.abandon()

    def _abort(self, req_id: int, error: TransferError) -> None:
        write = self._writes.pop(req_id, None)
        if write is None:
            return
        self._onesided.inflight.forget(write.key)
        if write.go_sent:  # a slice may still be landing in these pages
            self._onesided.inflight.drain(self, req_id, write.region, write.pages,
                                          self._onesided.drain_timeout)
        self._spawn(self._reply(req_id, error))

    def _count(self, write: InboundWrite, nbytes: int) -> None:
        write.landed += nbytes
        self._ctx.count_received(nbytes)
