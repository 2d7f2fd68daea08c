"""Rooms, fencing and notifications for backends whose writes are one-sided.

Mooncake (TCP/RDMA write), NIXL (UCX put) and CUDA IPC (a GPU copy into the
peer's memory) land bytes without the receiver's CPU seeing them, so the
receiver cannot check a write byte by byte as the ``tcp`` backend does.
``OneSidedBackend`` fences them around the data path instead, over a small
control connection per (sender, receiver) pair (``onesided_wire``):

1. **Before any byte**: the sender announces the write (BEGIN); the receiver
   admits it against its ``RoomTable`` (live room, current generation, reserved
   pages, unclaimed seq) and answers GO with the room's ``RoomReservation``; the
   sender checks its runs against that reservation itself before it posts a byte
   (so a write is never posted on the strength of the sender's own view).
2. **During**: the sender posts the write in slices of at most ``slice_bytes``,
   keeping up to ``max_inflight_slices`` of them in flight (the next one is
   posted as the oldest lands, so the link does not idle while the sender
   notices), and reports each landed slice in order (PROGRESS, which drives the
   receiver's byte counter). ``release_room`` answers the write FENCED at once;
   the sender posts no further slice. Bytes of the slices already posted can
   still land: that window (``slice_bytes * max_inflight_slices``) is inherent
   to one-sided writes, and is why a released page must not be handed out while
   a sender may still be posting (callers free pages after ``wait_final`` or
   after the sender is known to have stopped).
3. **After**: the receiver re-checks room and generation before it delivers the
   notification (``WriteTicket.finish``); a write that outlived its room gets
   FENCED and ``write`` raises ``FencingError``.

A lost control connection fails the sender's pending writes with
``PeerDisconnectedError`` at once (engine calls still running in threads are
abandoned) and, on the receiver, every unfinished room the sender wrote.

Engine details (how a peer's memory is named, how a slice is posted) live in a
``CopyEngine``; the peer-specific part of it is exchanged in the connect
handshake rather than the descriptor, so it is always fresh: a receiver that
restarted at the same address has new memory addresses, and a sender that
reconnects learns them before it writes.
"""

from __future__ import annotations

import abc
import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import (EndpointDescriptor, FencingError, Notification, PageRun,
                   PeerDisconnectedError, RegionSpec, RoomReservation, TransferError)
from .control import ControlBackend, ControlConfig
from .control_session import ControlSession
from .control_wire import Begin, FrameSocket
from .onesided_engine import CopyEngine, LocalRegion, plan_slices
from .onesided_peer import OneSidedPeer, PendingWrite
from .onesided_session import InFlight, OneSidedContext, OneSidedSession
from .onesided_wire import ONESIDED_PROTOCOL, ControlFrame, Hello, HelloReply, encode_progress


@dataclass(frozen=True)
class OneSidedConfig(ControlConfig):
    # A write is posted in slices of at most ``slice_bytes``, up to
    # ``max_inflight_slices`` of them at a time (a new one as the oldest lands).
    # Their product bounds the bytes that can still land after a fence, and must
    # cover the time until the sender notices a landed slice (engine polls run
    # every ~1 ms; a busy host delays them more), or the link idles. 4 x 16 MiB
    # measured best over loopback TCP on a 2-core host (BENCHMARKS.md); fewer,
    # smaller slices cost more CPU per byte there.
    slice_bytes: int = 16 << 20
    max_inflight_slices: int = 4
    notify_poll_s: float = 0.001  # longest sleep between in-band notification polls
    # Sender: after a write timed out, how long its in-flight slices may finish
    # before they are abandoned and the receiver is told CANCEL.
    cancel_grace_s: float = 2.0
    # Receiver: how long the pages of a fenced write stay blocked for new writes
    # when its sender never confirms that it stopped.
    drain_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.slice_bytes <= 0:
            raise ValueError(f"slice_bytes must be positive, got {self.slice_bytes}")
        if self.max_inflight_slices <= 0:
            raise ValueError(f"max_inflight_slices must be positive, "
                             f"got {self.max_inflight_slices}")


class OneSidedBackend(ControlBackend[OneSidedPeer, HelloReply]):
    """A ``TransferBackend`` over a ``CopyEngine``; see the module docstring.
    Connections, handshake, rooms and timeouts are ``ControlBackend``'s."""

    protocol = ONESIDED_PROTOCOL
    peer_type = OneSidedPeer
    config: OneSidedConfig

    def __init__(self, compat_hash: str, config: OneSidedConfig, engine: CopyEngine) -> None:
        super().__init__(compat_hash, config)
        self.engine = engine
        self.regions: dict[str, LocalRegion] = {}
        self._inflight = InFlight()
        self._onesided = OneSidedContext(config.drain_timeout_s, engine.local_info,
                                         self._inflight, engine.in_band_notifications)

    # -- lifecycle
    async def start(self) -> None:
        if self._listener is not None:
            return
        await self.engine.start(self.config.hostname)
        for region in self.regions.values():  # registered before start()
            self.engine.register(region)
        self._listen()
        if self.engine.in_band_notifications:
            self._spawn(self._poll_notifications(self._inflight))

    def _new_session(self, fsock: FrameSocket) -> ControlSession[Any]:
        return OneSidedSession(self._receiver, self._onesided, fsock)

    async def _poll_notifications(self, inflight: InFlight) -> None:
        """Polls the engine only while ``inflight.active`` (a write may be moving
        bytes); the sleep backs off from 50 us to ``notify_poll_s`` while nothing
        comes."""
        delay = 5e-5
        while True:
            await inflight.active.wait()
            received = self.engine.poll_notifications()
            for sender_id, message in received:
                inflight.deliver(sender_id, message)
            delay = 5e-5 if received else min(delay * 2, self.config.notify_poll_s)
            await asyncio.sleep(delay)

    async def close(self) -> None:
        await super().close()
        await self.engine.close()

    # -- memory
    def _add_region(self, spec: RegionSpec, tensor: torch.Tensor) -> None:
        region = LocalRegion(spec.name, tensor, spec.page_bytes)
        if self._listener is not None:  # else start() registers it
            self.engine.register(region)
        self.regions[spec.name] = region

    # -- sender side
    def _hello(self) -> bytes:
        return Hello(ONESIDED_PROTOCOL.version, self.name, self.compat_hash,
                     self.engine.sender_info()).encode()

    def _decode_hello_reply(self, body: bytes) -> HelloReply:
        return HelloReply.decode(body)

    async def _new_peer(self, peer: EndpointDescriptor, fsock: FrameSocket,
                        reply: HelloReply) -> OneSidedPeer:
        target = await self.engine.open_target(peer, reply.info)
        return OneSidedPeer(peer, fsock, target, self.engine.close_target)

    async def _write(self, peer: OneSidedPeer, region: str, runs: Sequence[PageRun],
                     note: Notification) -> int:
        req_id, pending = peer.open_request()
        posting = _Posting()
        try:
            sent = await self._run_write(peer, req_id, pending, posting,
                                         self.regions[region], runs, note)
        except BaseException:
            self._cancel_when_still(peer, req_id, posting.futures())
            raise
        peer.end_request(req_id, cancel=False)
        return sent

    def _cancel_when_still(self, peer: OneSidedPeer, req_id: int,
                           copies: set[asyncio.Future[None]]) -> None:
        """A failed write says CANCEL only once none of its bytes move any more
        (the receiver keeps the pages blocked until then): slices still in
        flight get ``cancel_grace_s`` to finish, then they are abandoned."""
        if not copies:
            peer.end_request(req_id, cancel=True)
            return
        self._spawn(self._cancel_after(peer, req_id, copies))

    async def _cancel_after(self, peer: OneSidedPeer, req_id: int,
                            copies: set[asyncio.Future[None]]) -> None:
        try:
            await asyncio.wait(copies, timeout=self.config.cancel_grace_s)
        finally:
            for copy in copies:
                copy.cancel()
            peer.end_request(req_id, cancel=True)

    async def _run_write(self, peer: OneSidedPeer, req_id: int, pending: PendingWrite,
                         posting: _Posting, local: LocalRegion, runs: Sequence[PageRun],
                         note: Notification) -> int:
        begin = Begin(local.name, tuple(runs), note)
        await peer.send(ControlFrame.BEGIN, req_id, begin.encode())
        slices = plan_slices(runs, local.page_bytes, self.config.slice_bytes)
        if not slices:  # notification only: the receiver finishes it at BEGIN
            await pending.ack
            return 0
        _check_reservation(await pending.go, local.name, runs, note)
        inband = self.engine.in_band_notifications
        window = self.config.max_inflight_slices
        for i, segments in enumerate(slices):
            last = i == len(slices) - 1
            # In-band: the last slice carries the notification, so it is posted
            # only once every earlier slice has landed (the notif then follows
            # every byte, whatever order the engine completes transfers in).
            room = 1 if last and inband else window
            while len(posting.copies) >= room:
                await self._land_oldest(peer, req_id, pending, posting)
            if pending.ack.done():  # fenced or lost: post nothing more
                break
            posting.post(asyncio.ensure_future(self.engine.copy(
                peer.target, local, segments, note if inband and last else None)),
                sum(s.nbytes for s in segments), last)
        while posting.copies:
            await self._land_oldest(peer, req_id, pending, posting)
        if not inband and not pending.ack.done():
            await peer.send(ControlFrame.DONE, req_id)
        await pending.ack
        return sum(r.num_pages for r in runs) * local.page_bytes

    async def _land_oldest(self, peer: OneSidedPeer, req_id: int, pending: PendingWrite,
                           posting: _Posting) -> None:
        """Wait until the oldest posted slice landed, then report it (PROGRESS;
        the last slice is reported by DONE or the notification). A FENCED
        answer meanwhile still waits for the slices in flight (so no byte moves
        once ``write`` raised); a lost peer does not. On timeout the slices are
        left to ``_cancel_after``."""
        copy, nbytes, last = posting.oldest()
        try:
            await asyncio.wait({copy, pending.ack}, return_when=asyncio.FIRST_COMPLETED)
            if not copy.done() and _lost(pending.ack):
                posting.cancel_all()  # the peer is gone: nothing left to wait for
                await pending.ack  # raises PeerDisconnectedError
            await asyncio.shield(copy)
        except TransferError as exc:
            if _failed(pending.ack):
                await pending.ack  # the receiver's verdict explains it better
            peer.broken(str(exc))
            raise PeerDisconnectedError(f"{self.name} transfer to "
                                        f"{peer.descriptor.address} failed: {exc}") from None
        posting.landed()
        if not last and not pending.ack.done():
            await peer.send(ControlFrame.PROGRESS, req_id, encode_progress(nbytes))


def _check_reservation(reservation: RoomReservation, region: str,
                       runs: Sequence[PageRun], note: Notification) -> None:
    """The sender's own fence check, against what the receiver reserved."""
    if (reservation.room_id, reservation.generation) != (note.room_id, note.generation):
        raise FencingError(f"receiver answered for room {reservation.room_id!r} gen "
                           f"{reservation.generation}, the write is for "
                           f"{note.room_id!r} gen {note.generation}")
    reservation.check_runs(region, runs)


@dataclass(eq=False)
class _Posting:
    """The slices of one write that are in flight, oldest first: (engine copy,
    bytes, whether it is the write's last slice)."""

    copies: collections.deque[tuple[asyncio.Future[None], int, bool]] = field(
        default_factory=collections.deque)

    def post(self, copy: asyncio.Future[None], nbytes: int, last: bool) -> None:
        copy.add_done_callback(_retrieve)
        self.copies.append((copy, nbytes, last))

    def oldest(self) -> tuple[asyncio.Future[None], int, bool]:
        return self.copies[0]

    def landed(self) -> None:
        self.copies.popleft()

    def futures(self) -> set[asyncio.Future[None]]:
        return {copy for copy, _, _ in self.copies if not copy.done()}

    def cancel_all(self) -> None:
        for copy in self.futures():
            copy.cancel()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # the write reports its own error


def _failed(fut: asyncio.Future[Any]) -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is not None


def _lost(fut: asyncio.Future[Any]) -> bool:
    return _failed(fut) and isinstance(fut.exception(), PeerDisconnectedError)


class EngineBackend(OneSidedBackend, abc.ABC):
    """Marker base for the concrete one-sided backends (registry entries)."""

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run on this machine (missing package, no
        CUDA), or None. Cheap: does not import the engine library."""
