"""Framing and socket I/O shared by every control connection.

The ``tcp`` backend and the one-sided layer (``onesided_wire``) speak different
frame types over the same framing: a fixed header ``(type u8, req_id u32,
body_len u64)`` followed by ``body_len`` bytes. Control bodies are
``struct``-packed or JSON (no pickle, no eval); tcp's DATA bodies are raw page
bytes that the receiver reads straight into the destination region. Both
protocols also share the BEGIN body (``Begin``) and the status body of ACK
(``encode_status``); each names its own frame numbers in a ``ControlProtocol``.

``FrameSocket`` drives a non-blocking socket through the event loop's low-level
API instead of ``asyncio`` streams: ``StreamReader`` would copy every chunk
into a ``bytes`` object, while ``recv_into`` here lands bytes in the tensor's
memory directly. Crucially, ``recv_some`` asks its caller for the target buffer
*synchronously, right before* the ``recv_into`` syscall, so a fencing decision
("is this room still live?") and the write into memory happen in the same
event-loop step: a ``release_room`` cannot slip in between.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .base import FencingError, Notification, PageRun, TransferError

HEADER = struct.Struct("!BIQ")
MAX_CONTROL_BODY = 16 << 20  # a control frame larger than this is a protocol error

_BEGIN = struct.Struct("!HI")  # region-name length, run count; then name, runs, note
_RUN = struct.Struct("!QQ")  # dst_page, num_pages
_STATUS = struct.Struct("!B")  # status; then a utf-8 message


@dataclass(frozen=True)
class ControlProtocol:
    """One protocol's numbering of the frames the shared control code handles
    itself (tcp and one-sided number them differently), and its version."""

    version: int
    frames: type[enum.IntEnum]  # every frame type of the protocol
    hello: enum.IntEnum  # sender -> receiver, first frame of a connection
    hello_reply: enum.IntEnum  # receiver -> sender, answers HELLO
    cancel: enum.IntEnum  # sender -> receiver, empty: the sender gave up on req_id
    ack: enum.IntEnum  # receiver -> sender, status body: final outcome of req_id
    label: str  # how errors name its frames ("frame", "control frame")


class Status(enum.IntEnum):
    OK = 0
    FENCED = 1
    ERROR = 2
    INCOMPATIBLE = 3


class ConnectionClosed(Exception):
    """The peer closed the socket or it failed."""


class ProtocolError(Exception):
    """The peer sent a malformed frame; the connection is dropped."""


# Everything decoding a hostile or corrupt frame can raise.
MALFORMED = (ProtocolError, ValueError, struct.error, UnicodeDecodeError)


@dataclass(frozen=True)
class Begin:
    """Opens write ``req_id``: where its bytes go and what to announce after."""

    region: str
    runs: tuple[PageRun, ...]  # src_page is not sent (the receiver needs dst only)
    notification: Notification

    def encode(self) -> bytes:
        name = self.region.encode()
        parts = [_BEGIN.pack(len(name), len(self.runs)), name]
        parts += [_RUN.pack(r.dst_page, r.num_pages) for r in self.runs]
        parts.append(self.notification.encode())
        return b"".join(parts)

    @classmethod
    def decode(cls, body: bytes) -> Begin:
        name_len, num_runs = _BEGIN.unpack_from(body)
        pos = _BEGIN.size + name_len
        region = body[_BEGIN.size:pos].decode()
        runs = []
        for _ in range(num_runs):
            dst, count = _RUN.unpack_from(body, pos)
            runs.append(PageRun(0, dst, count))
            pos += _RUN.size
        return cls(region, tuple(runs), Notification.decode(body[pos:]))


def encode_status(status: Status, text: str = "") -> bytes:
    return _STATUS.pack(status) + text.encode()


def decode_status(body: bytes) -> tuple[Status, str]:
    (status,) = _STATUS.unpack_from(body)
    return Status(status), body[_STATUS.size:].decode(errors="replace")


def status_error(status: Status, text: str) -> TransferError | None:
    if status is Status.OK:
        return None
    if status is Status.FENCED:
        return FencingError(text)
    return TransferError(text)


def status_of(error: TransferError | None) -> Status:
    if error is None:
        return Status.OK
    return Status.FENCED if isinstance(error, FencingError) else Status.ERROR


def configure_socket(sock: socket.socket) -> None:
    """Non-blocking, no Nagle delay, and kernel keepalive so that a silently
    vanished peer (no FIN/RST) still errors out within seconds."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


class FrameSocket:
    """Frame-level reads and writes on one connected non-blocking socket.

    One task reads (the connection's reader); any task may send, frames are
    serialized by a lock, and each frame is sent by a shielded task so that
    cancelling a sender never leaves half a frame on the wire."""

    def __init__(self, sock: socket.socket, protocol: ControlProtocol) -> None:
        self.sock = sock
        self.protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()
        self._header = bytearray(HEADER.size)
        self._read_waiter: asyncio.Future[None] | None = None
        self.closed = False

    # -- reading (single reader task)
    async def recv_some(self, pick_target: Callable[[], memoryview]) -> int:
        """Read once into ``pick_target()``, which is called in the same event-loop
        step as the syscall. Returns the number of bytes read (> 0)."""
        while True:
            target = pick_target()
            try:
                n = self.sock.recv_into(target)
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from exc
            if n == 0:
                raise ConnectionClosed("peer closed the connection")
            return n

    async def recv_exact_into(self, buf: memoryview) -> None:
        pos = 0
        while pos < len(buf):
            pos += await self.recv_some(lambda: buf[pos:])

    async def recv_header(self) -> tuple[enum.IntEnum, int, int]:
        """(frame type, req_id, body length); the body is left on the socket."""
        await self.recv_exact_into(memoryview(self._header))
        ftype, req_id, length = HEADER.unpack(self._header)
        try:
            return self.protocol.frames(ftype), req_id, length
        except ValueError:
            raise ProtocolError(f"unknown {self.protocol.label} type {ftype}") from None

    async def recv_body(self, length: int) -> bytes:
        if length > MAX_CONTROL_BODY:
            raise ProtocolError(f"control frame of {length} bytes")
        body = bytearray(length)
        await self.recv_exact_into(memoryview(body))
        return bytes(body)

    async def recv_frame(self) -> tuple[enum.IntEnum, int, bytes]:
        """A whole control frame: (frame type, req_id, body)."""
        ftype, req_id, length = await self.recv_header()
        return ftype, req_id, await self.recv_body(length)

    async def _readable(self) -> None:
        if self.closed:
            raise ConnectionClosed("connection closed")
        fut = self._read_waiter = self._loop.create_future()
        fd = self.sock.fileno()
        self._loop.add_reader(fd, _set_once, fut)
        try:
            await fut
        finally:
            self._read_waiter = None
            self._loop.remove_reader(fd)

    # -- writing (any task)
    async def send_frame(self, ftype: enum.IntEnum, req_id: int,
                         body: bytes | memoryview = b"") -> None:
        if self.closed:
            raise ConnectionClosed("connection closed")
        task = asyncio.ensure_future(self._send_locked(ftype, req_id, body))
        task.add_done_callback(_consume_exception)
        await asyncio.shield(task)

    async def _send_locked(self, ftype: enum.IntEnum, req_id: int,
                           body: bytes | memoryview) -> None:
        header = HEADER.pack(ftype, req_id, len(body))
        async with self._send_lock:
            try:
                if len(body) <= 64 << 10:  # small: one syscall, one segment
                    await self._loop.sock_sendall(self.sock, header + bytes(body))
                else:  # large: send the region's memory without copying it
                    await self._loop.sock_sendall(self.sock, header)
                    await self._loop.sock_sendall(self.sock, body)
            except OSError as exc:
                self.shutdown()
                raise ConnectionClosed(str(exc)) from exc

    def shutdown(self) -> None:
        """Make every pending and later read/send fail promptly. The fd stays
        open until ``aclose`` so no event-loop registration outlives it."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked sock_sendall
        except OSError:
            pass
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_exception(ConnectionClosed("connection closed"))

    async def aclose(self) -> None:
        """Shut down, let an in-progress send fail out, then close the fd.
        Called by the reader task once it stopped reading."""
        self.shutdown()
        try:
            await asyncio.wait_for(self._send_lock.acquire(), 2.0)
            self._send_lock.release()
        except asyncio.TimeoutError:
            pass
        self.sock.close()


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _consume_exception(task: asyncio.Future[None]) -> None:
    # The shielded send may fail after its caller stopped waiting (timeout);
    # the connection's reader reports the loss, so only mark it retrieved.
    if not task.cancelled():
        task.exception()
