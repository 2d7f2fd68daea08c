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
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .base import (DEFAULT_TIMEOUT_S, EndpointDescriptor, FencingError,
                   IncompatiblePeerError, Notification, PageRun, PeerDisconnectedError,
                   PeerHandle, RegionSpec, RoomReservation, TransferBackend,
                   TransferError, TransferTimeoutError, region_spec_for)
from .onesided_engine import CopyEngine, LocalRegion, Segment, plan_slices
from .onesided_peer import OneSidedPeer, PendingWrite
from .onesided_session import ControlContext, ControlSession, InFlight
from .onesided_wire import (PROTOCOL_VERSION, ControlFrame, ControlSocket, Hello,
                            HelloReply, encode_progress)
from .rooms import RoomTable
from .tcp_wire import MALFORMED, Begin, ConnectionClosed, configure_socket

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OneSidedConfig:
    host: str = "127.0.0.1"  # control-channel bind address; engine hostname
    port: int = 0  # control port; 0 = ephemeral (the descriptor reports it)
    advertise_host: str | None = None  # address peers dial; defaults to host
    # A write is posted in slices of at most ``slice_bytes``, up to
    # ``max_inflight_slices`` of them at a time (a new one as the oldest lands).
    # Their product bounds the bytes that can still land after a fence, and must
    # cover the time until the sender notices a landed slice (engine polls run
    # every ~1 ms; a busy host delays them more), or the link idles. 4 x 16 MiB
    # measured best over loopback TCP on a 2-core host (BENCHMARKS.md); fewer,
    # smaller slices cost more CPU per byte there.
    slice_bytes: int = 16 << 20
    max_inflight_slices: int = 4
    handshake_timeout: float = 10.0
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

    @property
    def hostname(self) -> str:
        return self.advertise_host or self.host


class OneSidedBackend(TransferBackend):
    """A ``TransferBackend`` over a ``CopyEngine``; see the module docstring."""

    def __init__(self, compat_hash: str, config: OneSidedConfig, engine: CopyEngine) -> None:
        super().__init__(compat_hash)
        self.config = config
        self.engine = engine
        self.regions: dict[str, LocalRegion] = {}
        self._specs: dict[str, RegionSpec] = {}
        self.rooms = RoomTable()
        self._inflight = InFlight()
        self._ctx = ControlContext(self.name, compat_hash, config.handshake_timeout,
                                   config.drain_timeout_s, self._specs, self.rooms,
                                   engine.local_info, self._count_received,
                                   self._inflight, engine.in_band_notifications)
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._cancels: set[asyncio.Task[None]] = set()
        self._sessions: set[ControlSession] = set()
        self._peers: set[OneSidedPeer] = set()
        self._by_address: dict[str, OneSidedPeer] = {}

    # -- lifecycle
    async def start(self) -> None:
        if self._listener is not None:
            return
        await self.engine.start(self.config.hostname)
        for region in self.regions.values():  # registered before start()
            self.engine.register(region)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # fast restart
        sock.bind((self.config.host, self.config.port))
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock
        self._tasks.append(asyncio.create_task(self._accept_loop(sock)))
        if self.engine.in_band_notifications:
            self._tasks.append(asyncio.create_task(self._poll_notifications(self._inflight)))

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. out of file descriptors: retry, don't die
                log.warning("%s control channel: accept failed: %s", self.name, exc)
                await asyncio.sleep(0.1)
                continue
            configure_socket(conn)
            session = ControlSession(self._ctx, ControlSocket(conn))
            self._sessions.add(session)
            session.task.add_done_callback(partial(_discard, self._sessions, session))

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
        for task in (*self._tasks, *self._cancels):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._cancels, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        await asyncio.gather(*(p.close() for p in list(self._peers)),
                             *(s.close() for s in list(self._sessions)))
        self.rooms.close()
        await self.engine.close()

    # -- memory
    async def register_region(self, name: str, tensor: torch.Tensor,
                              page_bytes: int | None = None) -> RegionSpec:
        if name in self.regions:
            raise ValueError(f"region {name!r} already registered")
        spec = region_spec_for(name, tensor, page_bytes)
        region = LocalRegion(name, tensor, spec.page_bytes)
        if self._listener is not None:  # else start() registers it
            self.engine.register(region)
        self.regions[name] = region
        self._specs[name] = spec
        return spec

    def descriptor(self) -> EndpointDescriptor:
        if self._listener is None:
            raise RuntimeError("start() the backend before publishing its descriptor")
        port = self._listener.getsockname()[1]
        return EndpointDescriptor(self.name, f"{self.config.hostname}:{port}",
                                  tuple(self._specs.values()), self.compat_hash)

    # -- sender side
    async def connect(self, peer: EndpointDescriptor, *,
                      timeout: float = DEFAULT_TIMEOUT_S) -> PeerHandle:
        """Reuses a live connection to the same descriptor: any number of rooms
        share it, so callers need not pool or close handles per request."""
        self._check_compatible(peer.backend, peer.compat_hash, peer.address)
        cached = self._by_address.get(peer.address)
        if cached is not None and cached.connected and cached.descriptor == peer:
            return cached
        try:
            handle = await asyncio.wait_for(self._open(peer), timeout)
        except asyncio.TimeoutError:
            raise TransferTimeoutError(f"connecting to {peer.address} took longer "
                                       f"than {timeout:.1f}s") from None
        except (OSError, ConnectionClosed) as exc:
            raise PeerDisconnectedError(f"cannot connect to {peer.address}: {exc}") from None
        self._peers.add(handle)
        self._by_address[peer.address] = handle
        handle.reader.add_done_callback(lambda _t: self._forget_peer(handle))
        return handle

    def _forget_peer(self, handle: OneSidedPeer) -> None:
        self._peers.discard(handle)
        if self._by_address.get(handle.descriptor.address) is handle:
            del self._by_address[handle.descriptor.address]

    def _check_compatible(self, backend: str, their_hash: str, address: str) -> None:
        if backend != self.name:
            raise IncompatiblePeerError(f"peer {address} uses backend {backend!r}, "
                                        f"this endpoint uses {self.name!r}")
        if their_hash != self.compat_hash:
            raise IncompatiblePeerError(
                f"peer {address} has compat hash {their_hash}, this endpoint has "
                f"{self.compat_hash}: model/dtype/KV layout differ, refusing")

    async def _open(self, peer: EndpointDescriptor) -> OneSidedPeer:
        host, _, port = peer.address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            configure_socket(sock)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            csock = ControlSocket(sock)
            hello = Hello(PROTOCOL_VERSION, self.name, self.compat_hash,
                          self.engine.sender_info())
            await csock.send_control(ControlFrame.HELLO, 0, hello.encode())
            ftype, _, body = await csock.recv_control()
            reply = HelloReply.decode(body)
            if ftype is not ControlFrame.HELLO_REPLY or not reply.ok:
                self._check_compatible(self.name, reply.compat_hash, peer.address)
                raise IncompatiblePeerError(
                    f"peer {peer.address} refused the handshake (protocol version "
                    f"{PROTOCOL_VERSION})")
            target = await self.engine.open_target(peer, reply.info)
        except MALFORMED as exc:
            sock.close()
            raise IncompatiblePeerError(f"malformed handshake from {peer.address}: "
                                        f"{exc}") from None
        except BaseException:
            sock.close()
            raise
        return OneSidedPeer(peer, csock, target, self.engine.close_target)

    async def write(self, peer: PeerHandle, room_id: str, generation: int,
                    region: str, runs: Sequence[PageRun],
                    notification: Notification, *,
                    timeout: float = DEFAULT_TIMEOUT_S) -> int:
        if not isinstance(peer, OneSidedPeer):
            raise TypeError(f"{self.name} backend cannot write through "
                            f"{type(peer).__name__}")
        local = self._check_write(peer, room_id, generation, region, runs, notification)
        started = time.perf_counter()
        req_id, pending = peer.open_request()
        posting = _Posting()
        done = False
        try:
            sent = await asyncio.wait_for(self._run_write(
                peer, req_id, pending, posting, local, runs, notification), timeout)
            done = True
        except asyncio.TimeoutError:
            raise TransferTimeoutError(f"write to room {room_id!r} on "
                                       f"{peer.descriptor.address} exceeded "
                                       f"{timeout:.1f}s") from None
        finally:
            if done:
                peer.end_request(req_id, cancel=False)
            else:
                self._cancel_when_still(peer, req_id, posting.futures())
        self._counters.bytes_sent += sent
        self._counters.transfer_seconds += time.perf_counter() - started
        return sent

    def _cancel_when_still(self, peer: OneSidedPeer, req_id: int,
                           copies: set[asyncio.Future[None]]) -> None:
        """A failed write says CANCEL only once none of its bytes move any more
        (the receiver keeps the pages blocked until then): slices still in
        flight get ``cancel_grace_s`` to finish, then they are abandoned."""
        if not copies:
            peer.end_request(req_id, cancel=True)
            return
        task = asyncio.create_task(self._cancel_after(peer, req_id, copies))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel_after(self, peer: OneSidedPeer, req_id: int,
                            copies: set[asyncio.Future[None]]) -> None:
        try:
            await asyncio.wait(copies, timeout=self.config.cancel_grace_s)
        finally:
            for copy in copies:
                copy.cancel()
            peer.end_request(req_id, cancel=True)

    def _check_write(self, peer: OneSidedPeer, room_id: str, generation: int, region: str,
                     runs: Sequence[PageRun], note: Notification) -> LocalRegion:
        if (note.room_id, note.generation) != (room_id, generation):
            raise ValueError(f"notification is for room {note.room_id!r} gen "
                             f"{note.generation}, write is for {room_id!r} gen {generation}")
        local = self.regions.get(region)
        if local is None:
            raise ValueError(f"no local region {region!r}")
        try:
            remote = peer.descriptor.region(region)
        except KeyError as exc:
            raise IncompatiblePeerError(str(exc)) from None
        if remote.page_bytes != local.page_bytes:
            raise IncompatiblePeerError(f"region {region!r}: local pages are "
                                        f"{local.page_bytes} B, peer's {remote.page_bytes} B")
        num_pages = local.nbytes // local.page_bytes
        for run in runs:
            if run.src_page + run.num_pages > num_pages:
                raise ValueError(f"{run} reads past local region {region!r} "
                                 f"({num_pages} pages)")
        return local

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

    # -- receiver side
    def reserve_room(self, room_id: str, generation: int, region: str,
                     page_ids: Iterable[int]) -> RoomReservation:
        spec = self._specs.get(region)
        if spec is None:
            raise ValueError(f"no local region {region!r}")
        return self.rooms.reserve(room_id, generation, spec, page_ids)

    def release_room(self, room_id: str) -> None:
        self.rooms.release(room_id)

    async def wait_notification(self, room_id: str, *,
                                timeout: float = DEFAULT_TIMEOUT_S) -> Notification:
        return await self.rooms.next_notification(room_id, timeout)

    def _count_received(self, nbytes: int) -> None:
        self._counters.bytes_received += nbytes


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


def _discard(sessions: set[ControlSession], session: ControlSession,
             _task: asyncio.Task[None]) -> None:
    sessions.discard(session)


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
