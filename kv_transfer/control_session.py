"""Receiver end of a control connection, shared by the tcp and one-sided backends.

A ``ControlSession`` serves one accepted connection: it answers the sender's
HELLO within ``handshake_timeout``, admits each write against the backend's
``RoomTable`` before any of its bytes may land (a refusal is answered at once),
ACKs outcomes, and when the connection ends, for whatever reason, fails every
unfinished room the sender wrote (``RoomTable.writer_lost``). The subclass
serves the frames that follow the handshake.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from .base import FencingError, RegionSpec, TransferError
from .control_wire import (MALFORMED, Begin, ConnectionClosed, FrameSocket, ProtocolError,
                           encode_status, status_of)
from .rooms import RoomTable, WriteTicket

log = logging.getLogger(__name__)

WriteT = TypeVar("WriteT")  # the subclass's state of one admitted write


@dataclass(frozen=True)
class ReceiverContext:
    """What sessions share with their backend, which owns every field."""

    backend_name: str
    compat_hash: str
    handshake_timeout: float
    regions: Mapping[str, RegionSpec]  # the registered regions, by name
    rooms: RoomTable
    count_received: Callable[[int], None]


class HelloFields(Protocol):
    """What both protocols' HELLO bodies say about the sender."""

    @property
    def version(self) -> int: ...

    @property
    def backend(self) -> str: ...

    @property
    def compat_hash(self) -> str: ...


class ControlSession(abc.ABC, Generic[WriteT]):
    """Server end of one connection: handshake, admission, ACKs, cleanup."""

    def __init__(self, ctx: ReceiverContext, fsock: FrameSocket) -> None:
        self._ctx = ctx
        self._sock = fsock
        self._writes: dict[int, WriteT] = {}  # admitted and unfinished, by req_id
        self._tasks: set[asyncio.Task[None]] = set()  # replies sent off the reader
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            if await self._handshake():
                await self._serve()
        except (ConnectionClosed, asyncio.TimeoutError, *MALFORMED) as exc:
            log.debug("%s session ended: %s", self._ctx.backend_name, exc)
        finally:
            self._sock.shutdown()  # no replies from here on
            self._connection_lost()
            self._writes.clear()
            self._ctx.rooms.writer_lost(self)
            for task in self._tasks:
                task.cancel()
            await self._sock.aclose()

    async def _handshake(self) -> bool:
        """Answer the sender's HELLO; False: refused (the reply says so)."""
        protocol = self._sock.protocol
        ftype, _, body = await asyncio.wait_for(self._sock.recv_frame(),
                                                self._ctx.handshake_timeout)
        if ftype is not protocol.hello:
            raise ProtocolError(f"expected HELLO, got {ftype.name}")
        ok, reply = self._answer_hello(body)
        await self._sock.send_frame(protocol.hello_reply, 0, reply)
        return ok

    def _accepts(self, hello: HelloFields) -> bool:
        """The sender speaks this protocol version, backend and compat hash."""
        return (hello.version == self._sock.protocol.version
                and hello.backend == self._ctx.backend_name
                and hello.compat_hash == self._ctx.compat_hash)

    async def _on_begin(self, req_id: int, body: bytes) -> None:
        """BEGIN: check the write against the room table before any byte of it
        may land; a refusal is ACKed at once."""
        begin = Begin.decode(body)
        if req_id in self._writes:
            raise ProtocolError(f"request {req_id} opened twice")
        try:
            if begin.region not in self._ctx.regions:
                raise FencingError(f"no region {begin.region!r} on this endpoint")
            ticket = self._ctx.rooms.admit(
                begin.notification, begin.region, begin.runs, writer=self,
                on_abort=lambda error: self._abort(req_id, error))
        except TransferError as exc:
            await self._reply(req_id, exc)
            return
        await self._admitted(req_id, begin, ticket)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a reply off the reader task (nothing once the connection is down)."""
        if self._sock.closed:
            coro.close()
            return
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, req_id: int, error: TransferError | None) -> None:
        body = encode_status(status_of(error), str(error) if error else "")
        await self._send(self._sock.protocol.ack, req_id, body)

    async def _send(self, ftype: enum.IntEnum, req_id: int, body: bytes) -> None:
        try:
            await self._sock.send_frame(ftype, req_id, body)
        except ConnectionClosed:
            pass  # the reader notices the loss and cleans up

    async def close(self) -> None:
        self._sock.shutdown()
        await asyncio.gather(self.task, return_exceptions=True)

    def _connection_lost(self) -> None:
        """Hook: the connection is down; ``_writes`` is cleared right after."""

    @abc.abstractmethod
    def _answer_hello(self, body: bytes) -> tuple[bool, bytes]:
        """Decode the HELLO body: (accepted, HELLO_REPLY body)."""

    @abc.abstractmethod
    async def _serve(self) -> None:
        """Serve the frames after the handshake until the connection ends."""

    @abc.abstractmethod
    async def _admitted(self, req_id: int, begin: Begin, ticket: WriteTicket) -> None:
        """Write ``req_id`` was admitted: track it (``_writes``) until it ends."""

    @abc.abstractmethod
    def _abort(self, req_id: int, error: TransferError) -> None:
        """The room was released/replaced/failed while write ``req_id`` was in
        flight (runs inside ``release_room``/``reserve_room``): answer it."""
