"""Receiver end of ``tcp`` connections: admit, land and ACK writes.

Invariant: a byte lands in a region only inside ``recv_into`` on a view picked
in the same event-loop step after checking that the write's room is still live
(``InboundSession._on_data``); everything else is drained into scratch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .base import PageRun, RegionSpec, TransferError
from .control_session import ControlSession, ReceiverContext
from .control_wire import Begin, FrameSocket, ProtocolError
from .rooms import WriteTicket
from .tcp_wire import FrameType, Hello, HelloReply


@dataclass(frozen=True)
class LocalRegion:
    """A registered region as the tcp backend uses it (both directions)."""

    spec: RegionSpec
    tensor: torch.Tensor  # keeps the memory alive while `view` is in use
    view: memoryview  # writable byte view of the tensor's storage, zero copy


def byte_view(tensor: torch.Tensor) -> memoryview:
    """Flat writable bytes of a contiguous CPU tensor, sharing its storage."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


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


class InboundSession(ControlSession[InboundWrite]):
    """Server end of one connection: admits, lands and ACKs writes."""

    _SCRATCH_BYTES = 1 << 20

    def __init__(self, ctx: ReceiverContext, memory: Mapping[str, LocalRegion],
                 fsock: FrameSocket) -> None:
        self._memory = memory  # the backend's regions, where DATA lands
        self._scratch = memoryview(bytearray(self._SCRATCH_BYTES))
        super().__init__(ctx, fsock)

    def _answer_hello(self, body: bytes) -> tuple[bool, bytes]:
        ok = self._accepts(Hello.decode(body))
        return ok, HelloReply(ok, self._ctx.compat_hash).encode()

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

    async def _admitted(self, req_id: int, begin: Begin, ticket: WriteTicket) -> None:
        write = InboundWrite(ticket, self._memory[begin.region], begin.runs)
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
        if self._writes.pop(req_id, None) is not None:
            self._spawn(self._reply(req_id, error))
