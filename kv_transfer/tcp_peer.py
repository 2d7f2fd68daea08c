"""Sender end of a ``tcp`` connection: matches ACKs to writes."""

from __future__ import annotations

import asyncio
import enum

from .base import PeerDisconnectedError
from .control_peer import ControlPeer
from .control_wire import ProtocolError, decode_status, status_error
from .tcp_wire import FrameType


class TcpPeer(ControlPeer[asyncio.Future[None]]):
    """Client end of one connection; a write waits on one future, its ACK."""

    def _new_pending(self) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    def drop_request(self, req_id: int) -> None:
        """The write gave up: forget its ACK and tell the receiver to drop it."""
        fut = self._pending.pop(req_id, None)
        if fut is not None and fut.done() and not fut.cancelled():
            fut.exception()  # retrieved: the caller already raised its own error
        self._send_cancel(req_id)

    def _on_reply(self, ftype: enum.IntEnum, req_id: int, body: bytes) -> None:
        if ftype is not FrameType.ACK:
            raise ProtocolError(f"unexpected {ftype.name} frame from server")
        status, text = decode_status(body)
        fut = self._pending.pop(req_id, None)
        if fut is None or fut.done():
            return  # the write already gave up (timeout/cancel)
        error = status_error(status, text)
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    def _fail(self, pending: asyncio.Future[None], error: PeerDisconnectedError) -> None:
        if not pending.done():
            pending.set_exception(error)
            pending.add_done_callback(lambda f: f.exception())
