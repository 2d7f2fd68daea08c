"""Fault-injection hooks of the ``tcp`` backend's sender, for the chaos tests
(tests/chaos). Off by default: each is armed only by an environment variable naming a
trigger file, read once when the backend is created, and does nothing while that file
does not exist. Never set them in production.

``EPD_FAULT_TCP_STALL_FILE=PATH``
    While PATH exists, this process's writes stop sending DATA frames (the connection
    stays up and says nothing): a transfer peer that stalls. Each write then ends with
    its own timeout (``TransferTimeoutError``); sending resumes once PATH is removed.
``EPD_FAULT_TCP_DROP_FILE=PATH``
    When PATH exists, the next DATA frame is not sent: the write's connection is
    dropped instead (its socket shut down, then reset on close) and PATH is removed,
    so one ``touch`` drops one connection mid-transfer.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .control_wire import FrameSocket

log = logging.getLogger(__name__)
STALL_ENV = "EPD_FAULT_TCP_STALL_FILE"
DROP_ENV = "EPD_FAULT_TCP_DROP_FILE"
POLL_S = 0.05


@dataclass(frozen=True)
class SenderFaults:
    stall_file: Path | None = None
    drop_file: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SenderFaults:
        stall, drop = env.get(STALL_ENV), env.get(DROP_ENV)
        faults = cls(Path(stall) if stall else None, Path(drop) if drop else None)
        if faults.armed:
            log.warning("tcp transfer fault injection armed: stall=%s drop=%s", stall, drop)
        return faults

    @property
    def armed(self) -> bool:
        return self.stall_file is not None or self.drop_file is not None

    async def before_data(self, fsock: FrameSocket) -> None:
        """Called before each DATA frame a write sends on `fsock`."""
        while self.stall_file is not None and self.stall_file.exists():
            await asyncio.sleep(POLL_S)  # cancelled by the write's timeout
        if self.drop_file is not None and _consume(self.drop_file):
            log.warning("fault injection: dropping the transfer connection to %s", _peer(fsock.sock))
            # Reset rather than a clean close once the fd is closed.
            fsock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            fsock.shutdown()


def _consume(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
