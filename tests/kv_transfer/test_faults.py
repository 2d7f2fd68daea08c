"""The tcp sender's fault-injection hooks (kv_transfer/faults.py): off unless armed; a
stall file holds DATA back until the write's timeout; a drop file resets one
connection mid-write, the receiver fails the room, and the next write reconnects."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from kv_transfer import (Notification, PageRun, PeerDisconnectedError, TransferBackend, TransferError,
                         TransferTimeoutError, create_backend)
from kv_transfer.faults import DROP_ENV, STALL_ENV, SenderFaults

pytestmark = pytest.mark.timeout(30)
PAGES, PAGE_BYTES = 8, 1 << 20  # eight 1 MiB pages: a write of several DATA frames


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[TransferBackend, torch.Tensor]]:
    kv = torch.zeros(PAGES, PAGE_BYTES, dtype=torch.uint8)
    backend = create_backend("tcp", compat_hash="h")
    await backend.start()
    await backend.register_region("kv", kv)
    yield backend, kv
    await backend.close()


async def _sender(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> tuple[TransferBackend, torch.Tensor]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    src = torch.randint(0, 255, (PAGES, PAGE_BYTES), dtype=torch.uint8)
    sender = create_backend("tcp", compat_hash="h", chunk_bytes=256 << 10)
    await sender.register_region("kv", src)
    return sender, src


async def _write(sender: TransferBackend, receiver: TransferBackend, room: str, timeout: float = 5.0) -> int:
    receiver.reserve_room(room, 1, "kv", range(PAGES))
    peer = await sender.connect(receiver.descriptor(), timeout=5)
    sent = await sender.write(peer, room, 1, "kv", [PageRun(0, 0, PAGES)],
                              Notification(room, 1, 0, b"", True), timeout=timeout)
    await receiver.wait_final(room, timeout=5)
    receiver.release_room(room)
    return sent


def test_hooks_are_off_by_default() -> None:
    assert not SenderFaults.from_env({}).armed
    assert SenderFaults.from_env({STALL_ENV: "/x"}).armed


async def test_stall_file_holds_data_until_the_write_times_out(
        receiver: tuple[TransferBackend, torch.Tensor], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    backend, kv = receiver
    stall = tmp_path / "stall"
    sender, src = await _sender(monkeypatch, {STALL_ENV: str(stall)})
    try:
        assert await _write(sender, backend, "before") == PAGES * PAGE_BYTES  # armed, not triggered
        stall.touch()
        start = time.monotonic()
        with pytest.raises(TransferTimeoutError):
            await _write(sender, backend, "stalled", timeout=0.5)
        assert 0.5 <= time.monotonic() - start < 2.0
        with pytest.raises(TransferError):  # nothing landed: the room never completes
            await backend.wait_notification("stalled", timeout=0.2)
        backend.release_room("stalled")
        stall.unlink()
        kv.zero_()
        await _write(sender, backend, "after")
        assert torch.equal(kv, src)
    finally:
        await sender.close()


async def test_drop_file_resets_one_connection_mid_write(
        receiver: tuple[TransferBackend, torch.Tensor], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    backend, kv = receiver
    drop = tmp_path / "drop"
    sender, src = await _sender(monkeypatch, {DROP_ENV: str(drop)})
    try:
        drop.touch()
        with pytest.raises(PeerDisconnectedError):
            await _write(sender, backend, "dropped")
        assert not drop.exists()  # one touch, one drop
        with pytest.raises(PeerDisconnectedError):  # the receiver failed the unfinished room
            await backend.wait_notification("dropped", timeout=2.0)
        backend.release_room("dropped")
        kv.zero_()
        await _write(sender, backend, "again")  # a new connection
        assert torch.equal(kv, src)
    finally:
        await sender.close()
