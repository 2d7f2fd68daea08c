"""Control-channel protocol of the one-sided backends (mooncake, nixl, cuda_ipc).

The bytes of a one-sided write travel through the transfer engine (Mooncake,
NIXL/UCX, CUDA IPC); everything else travels over one small asyncio TCP
connection per (sender, receiver) pair, framed like the ``tcp`` backend
(``control_wire``: type u8, req_id u32, body length u64) with its own frame
types. Bodies are ``struct``-packed or JSON; never pickle.

One write, as seen on the control channel::

    sender                                   receiver
    BEGIN(region, dst runs, notification) ->  RoomTable.admit (fence check)
                                          <-  GO(reservation)  | ACK(FENCED/ERROR)
    [sender re-checks its runs against the reservation, then posts slices
     through the engine; after each slice but the last:]
    PROGRESS(bytes)                       ->  counted while the room is live
    DONE (or the engine's in-band notif)  ->  room+generation re-checked, notify
                                          <-  ACK(OK | FENCED | ERROR)

The receiver may send ACK(FENCED) at any time (room released or replaced); the
sender posts no further slice after seeing it. A write without bytes (a
notification only) is finished by the receiver at BEGIN: no GO, just the ACK.
"""

from __future__ import annotations

import base64
import enum
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import RoomReservation
from .control_wire import ControlProtocol, ProtocolError

PROTOCOL_VERSION = 1

_VERSION = struct.Struct("!H")
_STATUS = struct.Struct("!B")
_FIELD_LEN = struct.Struct("!I")
_PROGRESS = struct.Struct("!Q")
_RESERVATION = struct.Struct("!HQHI")  # room len, generation, region len, range count
_RANGE = struct.Struct("!QQ")  # first page, page count


class ControlFrame(enum.IntEnum):
    HELLO = 1  # sender -> receiver: version, backend, compat hash, sender info
    HELLO_REPLY = 2  # receiver -> sender: status, compat hash, receiver info
    BEGIN = 3  # sender -> receiver: control_wire.Begin (region, dst runs, notification)
    GO = 4  # receiver -> sender: the room's reservation; bytes may be posted
    PROGRESS = 5  # sender -> receiver: a slice of the write has landed
    DONE = 6  # sender -> receiver: every slice has landed (engines without notifs)
    CANCEL = 7  # sender -> receiver: the sender gave up on req_id
    ACK = 8  # receiver -> sender: final outcome of req_id (control_wire status body)


ONESIDED_PROTOCOL = ControlProtocol(PROTOCOL_VERSION, ControlFrame, hello=ControlFrame.HELLO,
                                    hello_reply=ControlFrame.HELLO_REPLY,
                                    cancel=ControlFrame.CANCEL, ack=ControlFrame.ACK,
                                    label="control frame")


# ------------------------------------------------------------------ bodies


def pack_fields(fields: Sequence[bytes]) -> bytes:
    return b"".join(_FIELD_LEN.pack(len(f)) + f for f in fields)


def unpack_fields(body: bytes, count: int, start: int = 0) -> list[bytes]:
    fields, pos = [], start
    for _ in range(count):
        (length,) = _FIELD_LEN.unpack_from(body, pos)
        pos += _FIELD_LEN.size
        if pos + length > len(body):
            raise ProtocolError("truncated control field")
        fields.append(body[pos:pos + length])
        pos += length
    if pos != len(body):
        raise ProtocolError("trailing bytes in control frame")
    return fields


def encode_info(info: Mapping[str, Any]) -> bytes:
    return json.dumps(info, separators=(",", ":")).encode()


def decode_info(data: bytes) -> dict[str, Any]:
    info = json.loads(data)
    if not isinstance(info, dict):
        raise ProtocolError("endpoint info is not a JSON object")
    return info


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("expected a base64 string")
    return base64.b64decode(text, validate=True)


@dataclass(frozen=True)
class Hello:
    """First frame of a connection; ``info`` is engine-specific (JSON-safe)."""

    version: int
    backend: str
    compat_hash: str
    info: dict[str, Any]

    def encode(self) -> bytes:
        return _VERSION.pack(self.version) + pack_fields(
            [self.backend.encode(), self.compat_hash.encode(), encode_info(self.info)])

    @classmethod
    def decode(cls, body: bytes) -> Hello:
        (version,) = _VERSION.unpack_from(body)
        backend, compat, info = unpack_fields(body, 3, _VERSION.size)
        return cls(version, backend.decode(), compat.decode(), decode_info(info))


@dataclass(frozen=True)
class HelloReply:
    """``ok`` False: the receiver refused (version, backend or compat hash)."""

    ok: bool
    compat_hash: str
    info: dict[str, Any]

    def encode(self) -> bytes:
        return _STATUS.pack(0 if self.ok else 1) + pack_fields(
            [self.compat_hash.encode(), encode_info(self.info)])

    @classmethod
    def decode(cls, body: bytes) -> HelloReply:
        (status,) = _STATUS.unpack_from(body)
        compat, info = unpack_fields(body, 2, _STATUS.size)
        return cls(status == 0, compat.decode(), decode_info(info))


def encode_progress(nbytes: int) -> bytes:
    return _PROGRESS.pack(nbytes)


def decode_progress(body: bytes) -> int:
    if len(body) != _PROGRESS.size:
        raise ProtocolError("malformed PROGRESS frame")
    return int(_PROGRESS.unpack(body)[0])


def page_ranges(pages: frozenset[int]) -> list[tuple[int, int]]:
    """Sorted pages as (first, count) ranges: reservations are mostly contiguous."""
    ranges: list[tuple[int, int]] = []
    for page in sorted(pages):
        if ranges and ranges[-1][0] + ranges[-1][1] == page:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
        else:
            ranges.append((page, 1))
    return ranges


def encode_reservation(res: RoomReservation) -> bytes:
    room, region = res.room_id.encode(), res.region.encode()
    ranges = page_ranges(res.page_ids)
    parts = [_RESERVATION.pack(len(room), res.generation, len(region), len(ranges)),
             room, region]
    parts += [_RANGE.pack(first, count) for first, count in ranges]
    return b"".join(parts)


def decode_reservation(body: bytes, max_pages: int) -> RoomReservation:
    """``max_pages`` bounds the page set a (hostile) receiver can make us build."""
    room_len, generation, region_len, num_ranges = _RESERVATION.unpack_from(body)
    pos = _RESERVATION.size
    room = body[pos:pos + room_len].decode()
    region = body[pos + room_len:pos + room_len + region_len].decode()
    pos += room_len + region_len
    if len(body) != pos + num_ranges * _RANGE.size:
        raise ProtocolError("malformed GO frame")
    pages: set[int] = set()
    for i in range(num_ranges):
        first, count = _RANGE.unpack_from(body, pos + i * _RANGE.size)
        if len(pages) + count > max_pages:
            raise ProtocolError("reservation larger than the peer's region")
        pages.update(range(first, first + count))
    return RoomReservation(room, generation, region, frozenset(pages))
