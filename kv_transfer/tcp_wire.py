"""Frame types and handshake bodies of the ``tcp`` backend.

Framing, the BEGIN and status bodies and ``FrameSocket`` are shared with the
one-sided layer (``control_wire``). After the handshake a write is a BEGIN,
then DATA frames whose bodies are the raw page bytes, answered by one ACK.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .control_wire import ControlProtocol, Status, decode_status, encode_status

PROTOCOL_VERSION = 1

_HELLO = struct.Struct("!HH")  # version, backend-name length; then name, hash


class FrameType(enum.IntEnum):
    HELLO = 1  # client -> server: version, backend, compat hash
    HELLO_REPLY = 2  # server -> client: status, server compat hash
    BEGIN = 3  # client -> server: region, dst runs, notification
    DATA = 4  # client -> server: raw bytes continuing request req_id
    CANCEL = 5  # client -> server: the sender gave up on req_id
    ACK = 6  # server -> client: outcome of req_id


TCP_PROTOCOL = ControlProtocol(PROTOCOL_VERSION, FrameType, hello=FrameType.HELLO,
                               hello_reply=FrameType.HELLO_REPLY,
                               cancel=FrameType.CANCEL, ack=FrameType.ACK, label="frame")


@dataclass(frozen=True)
class Hello:
    version: int
    backend: str
    compat_hash: str

    def encode(self) -> bytes:
        name = self.backend.encode()
        return _HELLO.pack(self.version, len(name)) + name + self.compat_hash.encode()

    @classmethod
    def decode(cls, body: bytes) -> Hello:
        version, name_len = _HELLO.unpack_from(body)
        name = body[_HELLO.size:_HELLO.size + name_len].decode()
        return cls(version, name, body[_HELLO.size + name_len:].decode())


@dataclass(frozen=True)
class HelloReply:
    """A status body: OK, or INCOMPATIBLE (version, backend or compat hash)."""

    ok: bool
    compat_hash: str  # the server's, so that a refused client can say why

    def encode(self) -> bytes:
        return encode_status(Status.OK if self.ok else Status.INCOMPATIBLE, self.compat_hash)

    @classmethod
    def decode(cls, body: bytes) -> HelloReply:
        status, compat_hash = decode_status(body)
        return cls(status is Status.OK, compat_hash)
