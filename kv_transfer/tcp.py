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
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .base import (DEFAULT_TIMEOUT_S, EndpointDescriptor, FencingError,
                   IncompatiblePeerError, Notification, PageRun, PeerDisconnectedError,
                   PeerHandle, RegionSpec, RoomReservation, TransferBackend,
                   TransferError, TransferTimeoutError, region_spec_for,
                   register_backend)
from .rooms import RoomTable, WriteTicket
from .tcp_wire import (PROTOCOL_VERSION, Begin, ConnectionClosed, FrameSocket,
                       FrameType, Hello, ProtocolError, Status, configure_socket,
                       decode_status, encode_status)

log = logging.getLogger(__name__)

_MALFORMED = (ProtocolError, ValueError, struct.error, UnicodeDecodeError)


@dataclass(frozen=True)
class TcpConfig:
    host: str = "127.0.0.1"  # bind address
    port: int = 0  # 0 = ephemeral; the descriptor reports the bound port
    advertise_host: str | None = None  # address peers dial; defaults to host
    chunk_bytes: int = 4 << 20  # DATA frame size: interleaving vs. per-frame cost
    handshake_timeout: float = 10.0


@dataclass(frozen=True)
class _LocalRegion:
    spec: RegionSpec
    tensor: torch.Tensor  # keeps the memory alive while `view` is in use
    view: memoryview  # writable byte view of the tensor's storage, zero copy


def _byte_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _status_error(status: Status, text: str) -> TransferError | None:
    if status is Status.OK:
        return None
    if status is Status.FENCED:
        return FencingError(text)
    return TransferError(text)


def _status_of(error: TransferError | None) -> Status:
    if error is None:
        return Status.OK
    return Status.FENCED if isinstance(error, FencingError) else Status.ERROR


# ------------------------------------------------------------------ sender side


class _TcpPeer(PeerHandle):
    """Client end of one connection: sends frames, matches ACKs to writes."""

    def __init__(self, descriptor: EndpointDescriptor, fsock: FrameSocket) -> None:
        self.descriptor = descriptor
        self._sock = fsock
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._next_req = 0
        self.reader = asyncio.create_task(self._read_acks())
        self._cancels: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return not self._sock.closed

    def open_request(self) -> tuple[int, asyncio.Future[None]]:
        if not self.connected:
            raise PeerDisconnectedError(f"not connected to {self.descriptor.address}")
        self._next_req = (self._next_req + 1) % (1 << 32)
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next_req] = fut
        return self._next_req, fut

    def drop_request(self, req_id: int) -> None:
        """The write gave up: forget its ACK and tell the receiver to drop it."""
        fut = self._pending.pop(req_id, None)
        if fut is not None and fut.done() and not fut.cancelled():
            fut.exception()  # retrieved: the caller already raised its own error
        if self.connected:
            task = asyncio.create_task(self.send(FrameType.CANCEL, req_id))
            self._cancels.add(task)
            task.add_done_callback(self._cancel_done)

    def _cancel_done(self, task: asyncio.Task[None]) -> None:
        self._cancels.discard(task)
        if not task.cancelled():
            task.exception()

    async def send(self, ftype: FrameType, req_id: int,
                   body: bytes | memoryview = b"") -> None:
        try:
            await self._sock.send_frame(ftype, req_id, body)
        except ConnectionClosed as exc:
            raise PeerDisconnectedError(
                f"connection to {self.descriptor.address} lost: {exc}") from None

    async def _read_acks(self) -> None:
        reason = "closed"
        try:
            while True:
                ftype, req_id, length = await self._sock.recv_header()
                body = await self._sock.recv_body(length)
                if ftype is not FrameType.ACK:
                    raise ProtocolError(f"unexpected {ftype.name} frame from server")
                self._resolve(req_id, *decode_status(body))
        except (ConnectionClosed, *_MALFORMED) as exc:
            reason = str(exc)
        finally:
            self._fail_all(PeerDisconnectedError(
                f"connection to {self.descriptor.address} lost: {reason}"))
            await self._sock.aclose()

    def _resolve(self, req_id: int, status: Status, text: str) -> None:
        fut = self._pending.pop(req_id, None)
        if fut is None or fut.done():
            return  # the write already gave up (timeout/cancel)
        error = _status_error(status, text)
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    def _fail_all(self, error: PeerDisconnectedError) -> None:
        self._sock.shutdown()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)
                fut.add_done_callback(lambda f: f.exception())

    async def close(self) -> None:
        self._sock.shutdown()
        await asyncio.gather(self.reader, return_exceptions=True)


# ---------------------------------------------------------------- receiver side


class _InboundWrite:
    """Cursor over the destination byte ranges of one admitted write."""

    def __init__(self, ticket: WriteTicket, region: _LocalRegion,
                 runs: Sequence[PageRun]) -> None:
        self.ticket = ticket
        self._view = region.view
        page = region.spec.page_bytes
        self._ranges = [(r.dst_page * page, r.num_pages * page) for r in runs]
        self._index = 0
        self.remaining = sum(length for _, length in self._ranges)

    def target(self, limit: int) -> memoryview:
        offset, length = self._ranges[self._index]
        return self._view[offset:offset + min(length, limit)]

    def advance(self, n: int) -> None:
        offset, length = self._ranges[self._index]
        self._ranges[self._index] = (offset + n, length - n)
        if length == n:
            self._index += 1
        self.remaining -= n


class _InboundSession:
    """Server end of one connection: admits, lands and ACKs writes."""

    _SCRATCH_BYTES = 1 << 20

    def __init__(self, backend: TcpBackend, fsock: FrameSocket) -> None:
        self._backend = backend
        self._sock = fsock
        self._writes: dict[int, _InboundWrite] = {}
        self._scratch = memoryview(bytearray(self._SCRATCH_BYTES))
        self._replies: set[asyncio.Task[None]] = set()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            if await self._handshake():
                await self._serve()
        except (ConnectionClosed, asyncio.TimeoutError, *_MALFORMED) as exc:
            log.debug("tcp session ended: %s", exc)
        finally:
            self._sock.shutdown()  # no replies from here on
            self._writes.clear()
            self._backend.rooms.writer_lost(self)
            await self._sock.aclose()

    async def _handshake(self) -> bool:
        timeout = self._backend.config.handshake_timeout
        ftype, _, length = await asyncio.wait_for(self._sock.recv_header(), timeout)
        body = await asyncio.wait_for(self._sock.recv_body(length), timeout)
        if ftype is not FrameType.HELLO:
            raise ProtocolError(f"expected HELLO, got {ftype.name}")
        hello = Hello.decode(body)
        ours = self._backend.compat_hash
        ok = (hello.version == PROTOCOL_VERSION and hello.backend == "tcp"
              and hello.compat_hash == ours)
        status = Status.OK if ok else Status.INCOMPATIBLE
        await self._sock.send_frame(FrameType.HELLO_REPLY, 0, encode_status(status, ours))
        return ok

    async def _serve(self) -> None:
        while True:
            ftype, req_id, length = await self._sock.recv_header()
            if ftype is FrameType.DATA:
                await self._on_data(req_id, length)
            elif ftype is FrameType.BEGIN:
                await self._on_begin(req_id, await self._sock.recv_body(length))
            elif ftype is FrameType.CANCEL and length == 0:
                self._on_cancel(req_id)
            else:
                raise ProtocolError(f"unexpected {ftype.name} frame from client")

    async def _on_begin(self, req_id: int, body: bytes) -> None:
        begin = Begin.decode(body)
        region = self._backend.regions.get(begin.region)
        try:
            if region is None:
                raise FencingError(f"no region {begin.region!r} on this endpoint")
            ticket = self._backend.rooms.admit(
                begin.notification, begin.region, begin.runs, writer=self,
                on_abort=lambda error: self._abort(req_id, error))
        except TransferError as exc:
            await self._reply(req_id, exc)
            return
        write = _InboundWrite(ticket, region, begin.runs)
        if write.remaining == 0:
            await self._finish(req_id, write)
        else:
            self._writes[req_id] = write

    async def _on_data(self, req_id: int, length: int) -> None:
        write = self._writes.get(req_id)  # None: refused/aborted, drain the bytes
        if write is not None and length > write.remaining:
            raise ProtocolError(f"request {req_id}: more data than its runs")
        left = length
        while left:
            landed = False

            def pick() -> memoryview:
                # Runs right before recv_into: the fence check and the write into
                # the region happen in one event-loop step.
                nonlocal landed
                landed = write is not None and write.ticket.live
                if landed:
                    return write.target(left)
                return self._scratch[:min(left, self._SCRATCH_BYTES)]

            n = await self._sock.recv_some(pick)
            left -= n
            if landed:
                write.advance(n)
                self._backend.count_received(n)
        if write is not None and write.ticket.live and write.remaining == 0:
            del self._writes[req_id]
            await self._finish(req_id, write)

    async def _finish(self, req_id: int, write: _InboundWrite) -> None:
        try:
            write.ticket.finish(self._backend.rooms)
        except TransferError as exc:
            await self._reply(req_id, exc)
            return
        await self._reply(req_id, None)

    def _on_cancel(self, req_id: int) -> None:
        write = self._writes.pop(req_id, None)
        if write is not None:
            write.ticket.abandon()

    def _abort(self, req_id: int, error: TransferError) -> None:
        """Room released/replaced/failed while the write was in flight."""
        if self._writes.pop(req_id, None) is None or self._sock.closed:
            return
        task = asyncio.create_task(self._reply(req_id, error))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _reply(self, req_id: int, error: TransferError | None) -> None:
        body = encode_status(_status_of(error), str(error) if error else "")
        try:
            await self._sock.send_frame(FrameType.ACK, req_id, body)
        except ConnectionClosed:
            pass  # the reader notices the loss and cleans up

    async def close(self) -> None:
        self._sock.shutdown()
        await asyncio.gather(self.task, return_exceptions=True)


# ---------------------------------------------------------------------- backend


@register_backend("tcp")
class TcpBackend(TransferBackend):
    """Built-in backend: asyncio + TCP between CPU tensors. Default for CI."""

    def __init__(self, compat_hash: str, **config: object) -> None:
        super().__init__(compat_hash)
        self.config = TcpConfig(**config)  # type: ignore[arg-type]
        self.regions: dict[str, _LocalRegion] = {}
        self.rooms = RoomTable()
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._sessions: set[_InboundSession] = set()
        self._peers: set[_TcpPeer] = set()
        self._by_address: dict[str, _TcpPeer] = {}  # live connection reused per peer

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
            conn, _ = await loop.sock_accept(listener)
            configure_socket(conn)
            session = _InboundSession(self, FrameSocket(conn))
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
        self.regions[name] = _LocalRegion(spec, tensor, _byte_view(tensor))
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

    def _forget_peer(self, handle: _TcpPeer) -> None:
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

    async def _open(self, peer: EndpointDescriptor) -> _TcpPeer:
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
        return _TcpPeer(peer, fsock)

    async def write(self, peer: PeerHandle, room_id: str, generation: int,
                    region: str, runs: Sequence[PageRun],
                    notification: Notification, *,
                    timeout: float = DEFAULT_TIMEOUT_S) -> int:
        if not isinstance(peer, _TcpPeer):
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

    def _check_write(self, peer: _TcpPeer, room_id: str, generation: int, region: str,
                     runs: Sequence[PageRun], note: Notification) -> _LocalRegion:
        if (note.room_id, note.generation) != (room_id, generation):
            raise ValueError(f"notification is for room {note.room_id!r} gen "
                             f"{note.generation}, write is for {room_id!r} gen {generation}")
        local = self.regions.get(region)
        if local is None:
            raise ValueError(f"no local region {region!r}")
        remote = peer.descriptor.region(region)
        if remote.page_bytes != local.spec.page_bytes:
            raise IncompatiblePeerError(f"region {region!r}: local pages are "
                                        f"{local.spec.page_bytes} B, peer's "
                                        f"{remote.page_bytes} B")
        for run in runs:
            if run.src_page + run.num_pages > local.spec.num_pages:
                raise ValueError(f"{run} reads past local region {region!r} "
                                 f"({local.spec.num_pages} pages)")
        return local

    async def _stream(self, peer: _TcpPeer, req_id: int, ack: asyncio.Future[None],
                      local: _LocalRegion, runs: Sequence[PageRun],
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
    async def reserve_room(self, room_id: str, generation: int, region: str,
                           page_ids: Iterable[int]) -> RoomReservation:
        local = self.regions.get(region)
        if local is None:
            raise ValueError(f"no local region {region!r}")
        return self.rooms.reserve(room_id, generation, local.spec, page_ids)

    async def release_room(self, room_id: str) -> None:
        self.rooms.release(room_id)

    async def wait_notification(self, room_id: str, *,
                                timeout: float = DEFAULT_TIMEOUT_S) -> Notification:
        return await self.rooms.next_notification(room_id, timeout)

    def count_received(self, nbytes: int) -> None:
        self._counters.bytes_received += nbytes
