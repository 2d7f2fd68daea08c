"""What the ``tcp`` backend and the one-sided layer share: a control connection
per (sender, receiver) pair.

``ControlBackend`` listens for senders (one ``ControlSession`` per accepted
connection), connects to receivers (one cached ``ControlPeer`` per address,
reused by any number of rooms, so callers need not pool or close handles per
request), runs the HELLO handshake that checks protocol version, backend and
compat hash, checks a write's arguments against both endpoints' regions and
bounds it by its timeout. Its subclass moves the bytes: ``tcp`` streams them on
the connection itself, ``OneSidedBackend`` posts them through a copy engine and
uses the connection for fencing and notifications only.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import socket
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import torch

from .base import (DEFAULT_TIMEOUT_S, EndpointDescriptor, IncompatiblePeerError,
                   Notification, PageRun, PeerDisconnectedError, PeerHandle, RegionSpec,
                   RoomReservation, TransferBackend, TransferTimeoutError, region_spec_for)
from .control_peer import ControlPeer
from .control_session import ControlSession, ReceiverContext
from .control_wire import (MALFORMED, ConnectionClosed, ControlProtocol, FrameSocket,
                           configure_socket)
from .rooms import RoomTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlConfig:
    """The control connection's options, common to every backend's config."""

    host: str = "127.0.0.1"  # bind address (one-sided: also the engine's hostname)
    port: int = 0  # 0 = ephemeral; the descriptor reports the bound port
    advertise_host: str | None = None  # address peers dial; defaults to host
    handshake_timeout: float = 10.0

    @property
    def hostname(self) -> str:
        return self.advertise_host or self.host


class HelloAnswer(Protocol):
    """What both protocols' HELLO_REPLY bodies say."""

    @property
    def ok(self) -> bool:
        """False: the receiver refused (version, backend or compat hash)."""

    @property
    def compat_hash(self) -> str:
        """The receiver's."""


PeerT = TypeVar("PeerT", bound=ControlPeer[Any])
ReplyT = TypeVar("ReplyT", bound=HelloAnswer)


class ControlBackend(TransferBackend, Generic[PeerT, ReplyT]):
    """A ``TransferBackend`` whose endpoints talk over control connections;
    see the module docstring. Subclasses set ``protocol`` and ``peer_type``."""

    protocol: ControlProtocol  # frame numbering and version of the connections
    peer_type: type[PeerT]  # the handles ``connect`` returns and ``write`` takes
    config: ControlConfig  # the subclass's config dataclass extends it

    def __init__(self, compat_hash: str, config: ControlConfig) -> None:
        super().__init__(compat_hash)
        self.config = config
        self.rooms = RoomTable()
        self._specs: dict[str, RegionSpec] = {}  # registered regions, as published
        self._receiver = ReceiverContext(self.name, compat_hash, config.handshake_timeout,
                                         self._specs, self.rooms, self._count_received)
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # cancelled by close()
        self._sessions: set[ControlSession[Any]] = set()
        self._peers: set[PeerT] = set()
        self._by_address: dict[str, PeerT] = {}  # live connection reused per peer

    # -- lifecycle
    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # fast restart
        sock.bind((self.config.host, self.config.port))
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock
        self._spawn(self._accept_loop(sock))

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. out of file descriptors: retry, don't die
                log.warning("%s transfer backend: accept failed: %s", self.name, exc)
                await asyncio.sleep(0.1)
                continue
            configure_socket(conn)
            session = self._new_session(FrameSocket(conn, self.protocol))
            self._sessions.add(session)
            session.task.add_done_callback(partial(self._session_ended, session))

    def _session_ended(self, session: ControlSession[Any], _task: asyncio.Task[None]) -> None:
        self._sessions.discard(session)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task of the backend until it ends or ``close``."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        await asyncio.gather(*(p.close() for p in list(self._peers)),
                             *(s.close() for s in list(self._sessions)))
        self.rooms.close()

    # -- memory
    async def register_region(self, name: str, tensor: torch.Tensor,
                              page_bytes: int | None = None) -> RegionSpec:
        if name in self._specs:
            raise ValueError(f"region {name!r} already registered")
        spec = region_spec_for(name, tensor, page_bytes)
        self._add_region(spec, tensor)
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

    def _forget_peer(self, handle: PeerT) -> None:
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

    async def _open(self, peer: EndpointDescriptor) -> PeerT:
        host, _, port = peer.address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            configure_socket(sock)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            return await self._handshake(peer, FrameSocket(sock, self.protocol))
        except MALFORMED as exc:
            sock.close()
            raise IncompatiblePeerError(f"malformed handshake from {peer.address}: "
                                        f"{exc}") from None
        except BaseException:
            sock.close()
            raise

    async def _handshake(self, peer: EndpointDescriptor, fsock: FrameSocket) -> PeerT:
        await fsock.send_frame(self.protocol.hello, 0, self._hello())
        ftype, _, body = await fsock.recv_frame()
        reply = self._decode_hello_reply(body)
        if ftype is not self.protocol.hello_reply or not reply.ok:
            self._check_compatible(self.name, reply.compat_hash, peer.address)
            raise IncompatiblePeerError(f"peer {peer.address} refused the handshake "
                                        f"(protocol version {self.protocol.version})")
        return await self._new_peer(peer, fsock, reply)

    async def write(self, peer: PeerHandle, room_id: str, generation: int,
                    region: str, runs: Sequence[PageRun],
                    notification: Notification, *,
                    timeout: float = DEFAULT_TIMEOUT_S) -> int:
        if not isinstance(peer, self.peer_type):
            raise TypeError(f"{self.name} backend cannot write through "
                            f"{type(peer).__name__}")
        self._check_write(peer, room_id, generation, region, runs, notification)
        started = time.perf_counter()
        try:
            sent = await asyncio.wait_for(self._write(peer, region, runs, notification),
                                          timeout)
        except asyncio.TimeoutError:
            self._observe_write(started, 0, False)
            raise TransferTimeoutError(f"write to room {room_id!r} on "
                                       f"{peer.descriptor.address} exceeded "
                                       f"{timeout:.1f}s") from None
        except BaseException:
            self._observe_write(started, 0, False)
            raise
        self._counters.bytes_sent += sent
        self._counters.transfer_seconds += time.perf_counter() - started
        self._observe_write(started, sent, True)
        return sent

    def _observe_write(self, started: float, sent: int, ok: bool) -> None:
        if self.write_observer is not None:
            self.write_observer(time.perf_counter() - started, sent, ok)

    def _check_write(self, peer: PeerT, room_id: str, generation: int, region: str,
                     runs: Sequence[PageRun], note: Notification) -> None:
        if (note.room_id, note.generation) != (room_id, generation):
            raise ValueError(f"notification is for room {note.room_id!r} gen "
                             f"{note.generation}, write is for {room_id!r} gen {generation}")
        local = self._specs.get(region)
        if local is None:
            raise ValueError(f"no local region {region!r}")
        try:
            remote = peer.descriptor.region(region)
        except KeyError as exc:
            raise IncompatiblePeerError(str(exc)) from None
        if remote.page_bytes != local.page_bytes:
            raise IncompatiblePeerError(f"region {region!r}: local pages are "
                                        f"{local.page_bytes} B, peer's {remote.page_bytes} B")
        for run in runs:
            if run.src_page + run.num_pages > local.num_pages:
                raise ValueError(f"{run} reads past local region {region!r} "
                                 f"({local.num_pages} pages)")

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

    # -- what the subclass adds
    @abc.abstractmethod
    def _add_region(self, spec: RegionSpec, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` as region ``spec.name`` (``register_region`` checked it)."""

    @abc.abstractmethod
    def _new_session(self, fsock: FrameSocket) -> ControlSession[Any]:
        """Serve a sender that connected on ``fsock``."""

    @abc.abstractmethod
    def _hello(self) -> bytes:
        """The HELLO body this endpoint sends when it connects."""

    @abc.abstractmethod
    def _decode_hello_reply(self, body: bytes) -> ReplyT:
        """Decode a HELLO_REPLY body (``MALFORMED`` errors when it is not one)."""

    @abc.abstractmethod
    async def _new_peer(self, peer: EndpointDescriptor, fsock: FrameSocket,
                        reply: ReplyT) -> PeerT:
        """The handle of a connection that the receiver accepted."""

    @abc.abstractmethod
    async def _write(self, peer: PeerT, region: str, runs: Sequence[PageRun],
                     note: Notification) -> int:
        """Move ``runs`` of ``region`` to the peer and wait for its ACK; returns
        the bytes sent. Cancelled on timeout: stop, and tell the receiver."""
