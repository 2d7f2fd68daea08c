"""Receiver end of ``tcp`` connections: admit, land and ACK writes.

Invariant: a byte lands in a region only inside ``recv_into`` on a view picked
in the same event-loop step after checking that the write's room is still live
(``InboundSession._on_data``); everything else is drained into scratch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .base import FencingError, PageRun, RegionSpec, TransferError
from .rooms import RoomTable, WriteTicket
from .tcp_wire import (MALFORMED, PROTOCOL_VERSION, Begin, ConnectionClosed,
                       FrameSocket, FrameType, Hello, ProtocolError, Status,
                       encode_status, status_of)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRegion:
    """A registered region as the tcp backend uses it (both directions)."""

    spec: RegionSpec
    tensor: torch.Tensor  # keeps the memory alive while `view` is in use
    view: memoryview  # writable byte view of the tensor's storage, zero copy


def byte_view(tensor: torch.Tensor) -> memoryview:
    """Flat writable bytes of a contiguous CPU tensor, sharing its storage."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class ReceiverContext:
    """What sessions share with their backend, which owns every field."""

    backend_name: str
    compat_hash: str
    handshake_timeout: float
    regions: Mapping[str, LocalRegion]
    rooms: RoomTable
    count_received: Callable[[int], None]


class InboundWrite:
    """Cursor over the destination byte ranges of one admitted write."""

    def __init__(self, ticket: WriteTicket, region: LocalRegion,
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


class InboundSession:
    """Server end of one connection: admits, lands and ACKs writes."""

    _SCRATCH_BYTES = 1 << 20

    def __init__(self, ctx: ReceiverContext, fsock: FrameSocket) -> None:
        self._ctx = ctx
        self._sock = fsock
        self._writes: dict[int, InboundWrite] = {}
        self._scratch = memoryview(bytearray(self._SCRATCH_BYTES))
        self._replies: set[asyncio.Task[None]] = set()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            if await self._handshake():
                await self._serve()
        except (ConnectionClosed, asyncio.TimeoutError, *MALFORMED) as exc:
            log.debug("tcp session ended: %s", exc)
        finally:
            self._sock.shutdown()  # no replies from here on
            self._writes.clear()
            self._ctx.rooms.writer_lost(self)
            await self._sock.aclose()

    async def _handshake(self) -> bool:
        timeout = self._ctx.handshake_timeout
        ftype, _, length = await asyncio.wait_for(self._sock.recv_header(), timeout)
        body = await asyncio.wait_for(self._sock.recv_body(length), timeout)
        if ftype is not FrameType.HELLO:
            raise ProtocolError(f"expected HELLO, got {ftype.name}")
        hello = Hello.decode(body)
        ours = self._ctx.compat_hash
        ok = (hello.version == PROTOCOL_VERSION and hello.backend == self._ctx.backend_name
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
        write = InboundWrite(ticket, region, begin.runs)
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
                self._ctx.count_received(n)
        if write is not None and write.ticket.live and write.remaining == 0:
            del self._writes[req_id]
            await self._finish(req_id, write)

    async def _finish(self, req_id: int, write: InboundWrite) -> None:
        try:
            write.ticket.finish(self._ctx.rooms)
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
        body = encode_status(status_of(error), str(error) if error else "")
        try:
            await self._sock.send_frame(FrameType.ACK, req_id, body)
        except ConnectionClosed:
            pass  # the reader notices the loss and cleans up

    async def close(self) -> None:
        self._sock.shutdown()
        await asyncio.gather(self.task, return_exceptions=True)


