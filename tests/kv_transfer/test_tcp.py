"""tcp-specific checks: wire encoding and a receiver facing a hostile client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import torch

from kv_transfer import (Notification, PageRun, PeerDisconnectedError, TransferBackend,
                         create_backend)
from kv_transfer.control_wire import HEADER, Begin, Status, decode_status
from kv_transfer.tcp_wire import PROTOCOL_VERSION, FrameType, Hello

pytestmark = pytest.mark.timeout(30)


def test_begin_and_hello_round_trip() -> None:
    begin = Begin("kv", (PageRun(0, 7, 3), PageRun(0, 2, 1)),
                  Notification("r", 4, 1, b"p", True))
    assert Begin.decode(begin.encode()) == begin
    hello = Hello(PROTOCOL_VERSION, "tcp", "abc123")
    assert Hello.decode(hello.encode()) == hello


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[TransferBackend, torch.Tensor]]:
    kv = torch.zeros(8, 1024, dtype=torch.uint8)
    backend = create_backend("tcp", compat_hash="h")
    await backend.start()
    await backend.register_region("kv", kv)
    yield backend, kv
    await backend.close()


async def raw_client(backend: TransferBackend, compat: str = "h"
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Status]:
    host, _, port = backend.descriptor().address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = Hello(PROTOCOL_VERSION, "tcp", compat).encode()
    writer.write(HEADER.pack(FrameType.HELLO, 0, len(body)) + body)
    _, _, length = HEADER.unpack(await reader.readexactly(HEADER.size))
    status, their_hash = decode_status(await reader.readexactly(length))
    assert their_hash == "h"
    return reader, writer, status


async def assert_still_serves(backend: TransferBackend, kv: torch.Tensor) -> None:
    src = torch.full((8, 1024), 7, dtype=torch.uint8)
    sender = create_backend("tcp", compat_hash="h")
    await sender.register_region("kv", src)
    try:
        peer = await sender.connect(backend.descriptor(), timeout=5)
        backend.reserve_room("ok", 1, "kv", [6])
        await sender.write(peer, "ok", 1, "kv", [PageRun(0, 6, 1)],
                           Notification("ok", 1, 0, b"", True), timeout=5)
        assert torch.equal(kv[6], src[0])
    finally:
        await sender.close()


async def test_descriptor_reports_the_bound_port(
        receiver: tuple[TransferBackend, torch.Tensor]) -> None:
    backend, _ = receiver
    host, _, port = backend.descriptor().address.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    with pytest.raises(RuntimeError):
        create_backend("tcp", compat_hash="h").descriptor()


async def test_garbage_drops_only_that_connection(
        receiver: tuple[TransferBackend, torch.Tensor]) -> None:
    backend, kv = receiver
    host, _, port = backend.descriptor().address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\xff" * 64)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()
    await assert_still_serves(backend, kv)


async def test_wrong_hash_in_handshake_is_refused(
        receiver: tuple[TransferBackend, torch.Tensor]) -> None:
    backend, kv = receiver
    reader, writer, status = await raw_client(backend, compat="not-h")
    assert status is Status.INCOMPATIBLE
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await assert_still_serves(backend, kv)


async def test_sender_overrunning_its_runs_is_cut_off(
        receiver: tuple[TransferBackend, torch.Tensor]) -> None:
    backend, kv = receiver
    backend.reserve_room("r", 1, "kv", [2])
    reader, writer, status = await raw_client(backend)
    assert status is Status.OK
    begin = Begin("kv", (PageRun(0, 2, 1),), Notification("r", 1, 0, b"", True)).encode()
    writer.write(HEADER.pack(FrameType.BEGIN, 1, len(begin)) + begin)
    # One page admitted, three pages sent: the receiver must not write past page 2.
    writer.write(HEADER.pack(FrameType.DATA, 1, 3 * 1024) + b"\x01" * (3 * 1024))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert int(kv.count_nonzero()) == 0
    with pytest.raises(PeerDisconnectedError):  # its writer is gone mid-room
        await backend.wait_notification("r", timeout=1)
    await assert_still_serves(backend, kv)


async def test_register_region_rejects_unusable_tensors() -> None:
    backend = create_backend("tcp", compat_hash="h")
    kv = torch.zeros(4, 16)
    await backend.register_region("kv", kv)
    with pytest.raises(ValueError, match="already registered"):
        await backend.register_region("kv", kv)
    with pytest.raises(ValueError, match="contiguous"):
        await backend.register_region("t", torch.zeros(4, 16).t())


async def _ack(reader: asyncio.StreamReader) -> tuple[int, Status]:
    ftype, req_id, length = HEADER.unpack(await asyncio.wait_for(reader.readexactly(HEADER.size), 5))
    assert ftype == FrameType.ACK
    status, _ = decode_status(await reader.readexactly(length))
    return req_id, status


@pytest.mark.parametrize("begin", [
    Begin("kv", (PageRun(0, 3, 1),), Notification("r", 1, 0, b"", True)),  # another room's page
    Begin("kv", (PageRun(0, 2, 2),), Notification("r", 1, 0, b"", True)),  # runs past the room
    Begin("kv", (PageRun(0, 5, 1),), Notification("r", 1, 0, b"", True)),  # a page nobody reserved
    Begin("kv", (PageRun(0, 2, 1),), Notification("r", 0, 0, b"", True)),  # a stale generation
    Begin("kv", (PageRun(0, 2, 1),), Notification("nobody", 1, 0, b"", True)),  # no such room
    Begin("kv", (PageRun(0, 2**63, 1),), Notification("r", 1, 0, b"", True)),  # far past the region
    Begin("other", (PageRun(0, 2, 1),), Notification("r", 1, 0, b"", True)),  # no such region
])
async def test_hostile_begin_outside_the_reservation_lands_nothing(
        receiver: tuple[TransferBackend, torch.Tensor], begin: Begin) -> None:
    """A client that skips the sender's own checks: the receiver refuses the write
    before any byte lands, and the bytes it sends anyway are drained, not written."""
    backend, kv = receiver
    backend.reserve_room("r", 1, "kv", [2])
    backend.reserve_room("q", 1, "kv", [3])
    reader, writer, status = await raw_client(backend)
    assert status is Status.OK
    body = begin.encode()
    writer.write(HEADER.pack(FrameType.BEGIN, 1, len(body)) + body)
    assert await _ack(reader) == (1, Status.FENCED)
    writer.write(HEADER.pack(FrameType.DATA, 1, 2048) + b"\x01" * 2048)
    # Frames are served in order: once request 2's refusal is back, the DATA was drained.
    writer.write(HEADER.pack(FrameType.BEGIN, 2, len(body)) + body)
    assert await _ack(reader) == (2, Status.FENCED)
    writer.close()
    assert int(kv.count_nonzero()) == 0
    await assert_still_serves(backend, kv)
