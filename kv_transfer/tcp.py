"""The built-in ``tcp`` backend: asyncio over plain TCP, CPU memory.

One TCP connection per (sender, receiver) pair carries any number of concurrent
writes. A write is a BEGIN frame (region, destination page runs, notification)
followed by DATA frames of at most ``chunk_bytes`` taken straight from the
source region's memory; frames of concurrent writes interleave, so a small
write is never stuck behind a 256 MiB one for long. The receiver

1. checks the whole write against its ``RoomTable`` on BEGIN, before any byte
   lands (a refusal is an ACK with status FENCED, sent at once);
2. reads DATA straight into the destination region, re-checking that the room is
   live in the same event-loop step as each ``recv_into`` (see ``control_wire``);
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import EndpointDescriptor, Notification, PageRun, RegionSpec, register_backend
from .control import ControlBackend, ControlConfig
from .control_session import ControlSession
from .control_wire import Begin, FrameSocket
from .faults import SenderFaults
from .tcp_peer import TcpPeer
from .tcp_session import InboundSession, LocalRegion, byte_view
from .tcp_wire import TCP_PROTOCOL, FrameType, Hello, HelloReply


@dataclass(frozen=True)
class TcpConfig(ControlConfig):
    chunk_bytes: int = 4 << 20  # DATA frame size: interleaving vs. per-frame cost


@register_backend("tcp")
class TcpBackend(ControlBackend[TcpPeer, HelloReply]):
    """Built-in backend: asyncio + TCP between CPU tensors. Default for CI.

    Connections, handshake, rooms and timeouts are ``ControlBackend``'s; this
    class streams the bytes (``_stream``) and lands them (``InboundSession``)."""

    config_class = TcpConfig
    protocol = TCP_PROTOCOL
    peer_type = TcpPeer
    config: TcpConfig

    def __init__(self, compat_hash: str, **config: Any) -> None:
        """``config``: the fields of ``TcpConfig`` (host, port, advertise_host, ...)."""
        super().__init__(compat_hash, TcpConfig(**config))
        self.regions: dict[str, LocalRegion] = {}
        self._faults = SenderFaults.from_env()  # test hooks, off unless armed (faults.py)

    async def start(self) -> None:
        if self._listener is None:
            self._listen()

    async def register_region(self, name: str, tensor: torch.Tensor,
                              page_bytes: int | None = None) -> RegionSpec:
        if tensor.device.type != "cpu":
            raise ValueError(f"tcp backend needs CPU tensors, region {name!r} is on "
                             f"{tensor.device}")
        return await super().register_region(name, tensor, page_bytes)

    def _add_region(self, spec: RegionSpec, tensor: torch.Tensor) -> None:
        self.regions[spec.name] = LocalRegion(spec, tensor, byte_view(tensor))

    def _new_session(self, fsock: FrameSocket) -> ControlSession[Any]:
        return InboundSession(self._receiver, self.regions, fsock)

    # -- sender side
    def _hello(self) -> bytes:
        return Hello(TCP_PROTOCOL.version, self.name, self.compat_hash).encode()

    def _decode_hello_reply(self, body: bytes) -> HelloReply:
        return HelloReply.decode(body)

    async def _new_peer(self, peer: EndpointDescriptor, fsock: FrameSocket,
                        reply: HelloReply) -> TcpPeer:
        return TcpPeer(peer, fsock)

    async def _write(self, peer: TcpPeer, region: str, runs: Sequence[PageRun],
                     note: Notification) -> int:
        req_id, ack = peer.open_request()
        try:
            return await self._stream(peer, req_id, ack, self.regions[region], runs, note)
        except BaseException:
            peer.drop_request(req_id)
            raise

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
                if self._faults.armed:
                    await self._faults.before_data(peer.socket)
                await peer.send(FrameType.DATA, req_id,
                                local.view[offset:min(offset + chunk, end)])
            total += end - start
        await ack
        return total
