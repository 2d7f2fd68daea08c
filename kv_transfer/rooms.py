"""Receiver-side room bookkeeping shared by backends.

A room is ``(room_id, generation)`` plus the pages of one region it may write.
``RoomTable`` owns every live room of one endpoint and enforces:

* a page belongs to at most one live room (overlap is a caller bug);
* writes are admitted only for the live generation and reserved pages;
* releasing/replacing a room kills every admitted write (``WriteTicket``) and
  wakes waiters with ``FencingError``;
* notifications reach waiters in ``seq`` order (0, 1, ...), each seq once, and
  none after the final one.

Everything runs on one event loop thread; no locking needed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from .base import (FencingError, Notification, PageRun, PeerDisconnectedError,
                   RegionSpec, RoomReservation, TransferError, TransferTimeoutError)

AbortHook = Callable[[TransferError], None]


class WriteTicket:
    """One admitted write. ``live`` turns False (and ``on_abort`` fires once) when
    its room is released, replaced or failed."""

    def __init__(self, room: _Room, note: Notification, on_abort: AbortHook) -> None:
        self._room = room
        self.notification = note
        self._on_abort = on_abort
        self.live = True

    def kill(self, error: TransferError) -> None:
        if self.live:
            self.live = False
            self._on_abort(error)

    def finish(self, table: RoomTable) -> None:
        """Data landed: hand the notification out. Raises FencingError if dead."""
        if not self.live:
            raise FencingError(f"room {self.notification.room_id!r} was released "
                               "during the write")
        self._room.tickets.discard(self)
        table.deliver(self.notification)

    def abandon(self) -> None:
        """The sender gave up: the seq may be written again."""
        self.live = False
        room, seq = self._room, self.notification.seq
        room.tickets.discard(self)
        room.claimed.discard(seq)
        if room.final_seq == seq:
            room.final_seq = None


@dataclass(eq=False)
class _Room:
    reservation: RoomReservation
    ready: deque[Notification] = field(default_factory=deque)
    pending: dict[int, Notification] = field(default_factory=dict)  # out of order
    claimed: set[int] = field(default_factory=set)  # seqs admitted or delivered
    next_seq: int = 0
    final_seq: int | None = None  # set when the final seq is admitted/delivered
    error: TransferError | None = None
    writers: set[Hashable] = field(default_factory=set)
    tickets: set[WriteTicket] = field(default_factory=set)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.final_seq is not None and self.next_seq > self.final_seq

    def fail(self, error: TransferError) -> None:
        self.error = error
        for ticket in list(self.tickets):
            ticket.kill(error)
        self.tickets.clear()
        self.wakeup.set()


class RoomTable:
    """Live rooms of one endpoint, keyed by room id."""

    def __init__(self) -> None:
        self._rooms: dict[str, _Room] = {}
        self._page_owner: dict[tuple[str, int], str] = {}  # (region, page) -> room

    def reserve(self, room_id: str, generation: int, region: RegionSpec,
                page_ids: Iterable[int]) -> RoomReservation:
        pages = frozenset(page_ids)
        bad = [p for p in pages if not 0 <= p < region.num_pages]
        if bad:
            raise ValueError(f"pages {sorted(bad)[:8]} outside region "
                             f"{region.name!r} ({region.num_pages} pages)")
        old = self._rooms.get(room_id)
        if old is not None and generation <= old.reservation.generation:
            raise ValueError(f"room {room_id!r}: generation {generation} is not "
                             f"newer than live generation {old.reservation.generation}")
        clash = [p for p in pages
                 if self._page_owner.get((region.name, p), room_id) != room_id]
        if clash:
            owner = self._page_owner[(region.name, clash[0])]
            raise ValueError(f"pages {sorted(clash)[:8]} already reserved by room "
                             f"{owner!r}")
        if old is not None:
            self.release(room_id)  # fences the old generation's writes and waiters
        reservation = RoomReservation(room_id, generation, region.name, pages)
        self._rooms[room_id] = _Room(reservation)
        self._page_owner.update({(region.name, p): room_id for p in pages})
        return reservation

    def release(self, room_id: str) -> None:
        room = self._rooms.pop(room_id, None)
        if room is None:
            return
        region = room.reservation.region
        for page in room.reservation.page_ids:
            del self._page_owner[(region, page)]
        gen = room.reservation.generation
        room.fail(FencingError(f"room {room_id!r} gen {gen} was released"))

    def reservation(self, room_id: str) -> RoomReservation:
        return self._live(room_id).reservation

    def admit(self, note: Notification, region: str, runs: Sequence[PageRun],
              writer: Hashable, on_abort: AbortHook) -> WriteTicket:
        """Check a write before any byte lands; raises FencingError/TransferError."""
        room = self._checked(note.room_id, note.generation)
        room.reservation.check_runs(region, runs)
        self._claim_seq(room, note)
        room.writers.add(writer)
        ticket = WriteTicket(room, note, on_abort)
        room.tickets.add(ticket)
        return ticket

    def is_live(self, room_id: str, generation: int) -> bool:
        room = self._rooms.get(room_id)
        return (room is not None and room.error is None
                and room.reservation.generation == generation)

    def deliver(self, note: Notification) -> None:
        """Queue a notification whose data has landed (one-sided backends call
        this directly); waiters get notifications in seq order."""
        room = self._checked(note.room_id, note.generation)
        if note.seq < room.next_seq or note.seq in room.pending:
            raise TransferError(f"room {note.room_id!r}: seq {note.seq} delivered twice")
        if room.final_seq is not None and note.seq > room.final_seq:
            raise TransferError(f"room {note.room_id!r}: seq {note.seq} after the "
                                f"final seq {room.final_seq}")
        room.claimed.add(note.seq)
        room.pending[note.seq] = note
        if note.final:
            room.final_seq = note.seq
        while room.next_seq in room.pending:
            room.ready.append(room.pending.pop(room.next_seq))
            room.next_seq += 1
        room.wakeup.set()

    def writer_lost(self, writer: Hashable) -> None:
        """A connection died: rooms it wrote and that are unfinished fail."""
        for room_id, room in self._rooms.items():
            if writer in room.writers and not room.finished and room.error is None:
                room.fail(PeerDisconnectedError(
                    f"writer of room {room_id!r} disconnected before the final chunk"))

    async def next_notification(self, room_id: str, timeout: float) -> Notification:
        room = self._rooms.get(room_id)
        if room is None:
            raise FencingError(f"unknown room {room_id!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not room.ready and room.error is None:
            if room.finished:
                raise TransferError(f"room {room_id!r}: final notification "
                                    "already delivered")
            room.wakeup.clear()
            remaining = deadline - loop.time()
            try:
                await asyncio.wait_for(room.wakeup.wait(), max(remaining, 0))
            except asyncio.TimeoutError:
                raise TransferTimeoutError(f"no notification for room {room_id!r} "
                                           f"within {timeout:.1f}s") from None
        if room.ready:
            return room.ready.popleft()
        assert room.error is not None
        raise room.error

    def close(self) -> None:
        for room_id in list(self._rooms):
            self.release(room_id)

    def _live(self, room_id: str) -> _Room:
        room = self._rooms.get(room_id)
        if room is None:
            raise FencingError(f"unknown or released room {room_id!r}")
        return room

    def _checked(self, room_id: str, generation: int) -> _Room:
        room = self._live(room_id)
        live_gen = room.reservation.generation
        if generation != live_gen:
            raise FencingError(f"room {room_id!r}: stale generation {generation} "
                               f"(live generation is {live_gen})")
        if room.error is not None:
            raise FencingError(f"room {room_id!r} failed earlier: {room.error}")
        return room

    @staticmethod
    def _claim_seq(room: _Room, note: Notification) -> None:
        if note.seq in room.claimed:
            raise TransferError(f"room {note.room_id!r}: seq {note.seq} written twice")
        last_seen = max(room.claimed, default=-1)
        if room.final_seq is not None and note.seq > room.final_seq:
            raise TransferError(f"room {note.room_id!r}: seq {note.seq} after the "
                                f"final seq {room.final_seq}")
        if note.final and last_seen > note.seq:
            raise TransferError(f"room {note.room_id!r}: final seq {note.seq} below "
                                f"already written seq {last_seen}")
        room.claimed.add(note.seq)
        if note.final:
            room.final_seq = note.seq  # later seqs are refused from now on
