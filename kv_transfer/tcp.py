"""The built-in ``tcp`` backend: asyncio over plain TCP, CPU memory.

One TCP connection per (sender, receiver) pair carries any number of concurrent
writes. A write is a BEGIN frame (region, destination page runs, notification)
followed by DATA frames of at most ``chunk_bytes`` taken straight from the
source region's memory; frames of concurrent writes interleave, so a small
write is never stuck behind a 256 MiB one for long. The receiver

1. checks the whole write against its ``RoomTable`` on BEGIN, before any byte
   lands (a refusal is an ACK with status FENCED, sent at once);
2. reads DATA straight into the destination region, re-checking that the room is
   live in the same event-loop step as each ``recv_into`` (see ``tcp_wire``);
   bytes of a refused or aborted write are drained into a scratch buffer;
3. after the last byte, queues the notification and ACKs; ``write`` returns
   only on that ACK.

``release_room`` kills the room's in-flight writes: their senders get FENCED at
once and stop streaming. A lost connection fails the sender's pending writes
with ``PeerDisconnectedError`` and, on the receiver, every unfinished room the
connection wrote to.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import (DEFAULT_TIMEOUT_S, EndpointDescriptor, IncompatiblePeerError,
                   Notification, PageRun, PeerDisconnectedError, PeerHandle, RegionSpec,
                   RoomReservation, TransferBackend, TransferTimeoutError,
                   region_spec_for, register_backend)
from .rooms import RoomTable
from .tcp_peer import TcpPeer
from .tcp_session import InboundSession, LocalRegion, ReceiverContext, byte_view
from .tcp_wire import (PROTOCOL_VERSION, Begin, ConnectionClosed, FrameSocket,
                       FrameType, Hello, Status, configure_socket, decode_status)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TcpConfig:
    host: str = "127.0.0.1"  # bind address
    port: int = 0  # 0 = ephemeral; the descriptor reports the bound port
    advertise_host: str | None = None  # address peers dial; defaults to host
    chunk_bytes: int = 4 << 20  # DATA frame size: interleaving vs. per-frame cost
    handshake_timeout: float = 10.0



# ---------------------------------------------------------------------- backend


@register_backend("tcp")
class TcpBackend(TransferBackend):
    """Built-in backend: asyncio + TCP between CPU tensors. Default for CI."""

    config_class = TcpConfig

    def __init__(self, compat_hash: str, **config: Any) -> None:
        """``config``: the fields of ``TcpConfig`` (host, port, advertise_host, ...)."""
        super().__init__(compat_hash)
        self.config = TcpConfig(**config)
        self.regions: dict[str, LocalRegion] = {}
        self.rooms = RoomTable()
        self._receiver = ReceiverContext(self.name, compat_hash,
                                         self.config.handshake_timeout, self.regions,
                                         self.rooms, self._count_received)
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._sessions: set[InboundSession] = set()
        self._peers: set[TcpPeer] = set()
        self._by_address: dict[str, TcpPeer] = {}  # live connection reused per peer

    # -- lifecycle
    async def start(self) -> None:
        if self._listener is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # fast restart
        sock.bind((self.config.host, self.config.port))
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock
        self._accept_task = asyncio.create_task(self._accept_loop(sock))

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. out of file descriptors: retry, don't die
                log.warning("tcp transfer backend: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            configure_socket(conn)
            session = InboundSession(self._receiver, FrameSocket(conn))
            self._sessions.add(session)
            session.task.add_done_callback(lambda _t, s=session: self._sessions.discard(s))

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        await asyncio.gather(*(p.close() for p in list(self._peers)),
                             *(s.close() for s in list(self._sessions)))
        self.rooms.close()

    # -- memory
    async def register_region(self, name: str, tensor: torch.Tensor,
                              page_bytes: int | None = None) -> RegionSpec:
        if tensor.device.type != "cpu":
            raise ValueError(f"tcp backend needs CPU tensors, region {name!r} is on "
                             f"{tensor.device}")
        if name in self.regions:
            raise ValueError(f"region {name!r} already registered")
        spec = region_spec_for(name, tensor, page_bytes)
        self.regions[name] = LocalRegion(spec, tensor, byte_view(tensor))
        return spec

    def descriptor(self) -> EndpointDescriptor:
        if self._listener is None:
            raise RuntimeError("start() the backend before publishing its descriptor")
        port = self._listener.getsockname()[1]
        host = self.config.advertise_host or self.config.host
        regions = tuple(r.spec for r in self.regions.values())
        return EndpointDescriptor(self.name, f"{host}:{port}", regions, self.compat_hash)

    # -- sender side
    async def connect(self, peer: EndpointDescriptor, *,
                      timeout: float = DEFAULT_TIMEOUT_S) -> PeerHandle:
        """Reuses a live connection to the same address and hash: any number of
        rooms share it, so callers need not pool or close handles per request."""
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

    def _forget_peer(self, handle: TcpPeer) -> None:
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

    async def _open(self, peer: EndpointDescriptor) -> TcpPeer:
        host, _, port = peer.address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            configure_socket(sock)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            fsock = FrameSocket(sock)
            hello = Hello(PROTOCOL_VERSION, self.name, self.compat_hash)
            await fsock.send_frame(FrameType.HELLO, 0, hello.encode())
            ftype, _, length = await fsock.recv_header()
            status, their_hash = decode_status(await fsock.recv_body(length))
        except BaseException:
            sock.close()
            raise
        if ftype is not FrameType.HELLO_REPLY or status is not Status.OK:
            sock.close()
            self._check_compatible(self.name, their_hash, peer.address)
            raise IncompatiblePeerError(f"peer {peer.address} refused the handshake "
                                        f"(protocol version {PROTOCOL_VERSION})")
        return TcpPeer(peer, fsock)

    async def write(self, peer: PeerHandle, room_id: str, generation: int,
                    region: str, runs: Sequence[PageRun],
                    notification: Notification, *,
                    timeout: float = DEFAULT_TIMEOUT_S) -> int:
        if not isinstance(peer, TcpPeer):
            raise TypeError(f"tcp backend cannot write through {type(peer).__name__}")
        local = self._check_write(peer, room_id, generation, region, runs, notification)
        started = time.perf_counter()
        req_id, ack = peer.open_request()
        done = False
        try:
            sent = await asyncio.wait_for(
                self._stream(peer, req_id, ack, local, runs, notification), timeout)
            done = True
        except asyncio.TimeoutError:
            raise TransferTimeoutError(f"write to room {room_id!r} on "
                                       f"{peer.descriptor.address} exceeded "
                                       f"{timeout:.1f}s") from None
        finally:
            if not done:
                peer.drop_request(req_id)
        self._counters.bytes_sent += sent
        self._counters.transfer_seconds += time.perf_counter() - started
        return sent

    def _check_write(self, peer: TcpPeer, room_id: str, generation: int, region: str,
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
        if remote.page_bytes != local.spec.page_bytes:
            raise IncompatiblePeerError(f"region {region!r}: local pages are "
                                        f"{local.spec.page_bytes} B, peer's "
                                        f"{remote.page_bytes} B")
        for run in runs:
            if run.src_page + run.num_pages > local.spec.num_pages:
                raise ValueError(f"{run} reads past local region {region!r} "
                                 f"({local.spec.num_pages} pages)")
        return local

    async def _stream(self, peer: TcpPeer, req_id: int, ack: asyncio.Future[None],
                      local: LocalRegion, runs: Sequence[PageRun],
                      note: Notification) -> int:
        begin = Begin(local.spec.name, tuple(runs), note)
        await peer.send(FrameType.BEGIN, req_id, begin.encode())
        page, chunk = local.spec.page_bytes, self.config.chunk_bytes
        total = 0
        for run in runs:
            start, end = run.src_page * page, (run.src_page + run.num_pages) * page
            for offset in range(start, end, chunk):
                if ack.done():  # refused or aborted: stop streaming
                    break
                await peer.send(FrameType.DATA, req_id,
                                local.view[offset:min(offset + chunk, end)])
            total += end - start
        await ack
        return total

    # -- receiver side
    def reserve_room(self, room_id: str, generation: int, region: str,
                     page_ids: Iterable[int]) -> RoomReservation:
        local = self.regions.get(region)
        if local is None:
            raise ValueError(f"no local region {region!r}")
        return self.rooms.reserve(room_id, generation, local.spec, page_ids)

    def release_room(self, room_id: str) -> None:
        self.rooms.release(room_id)

    async def wait_notification(self, room_id: str, *,
                                timeout: float = DEFAULT_TIMEOUT_S) -> Notification:
        return await self.rooms.next_notification(room_id, timeout)

    def _count_received(self, nbytes: int) -> None:
        self._counters.bytes_received += nbytes
