"""Conformance suite: every registered backend must pass all of it.

Endpoints are real (real sockets/memory, no mocks); tests that kill or freeze a
peer run it as a separate process (``peer_main``). A backend joins the suite by
adding a ``BackendFactory`` in ``support.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import signal
import time
from collections.abc import Awaitable, Callable
from hashlib import sha256

import pytest
import torch

from kv_transfer import (EndpointDescriptor, FencingError, IncompatiblePeerError,
                         Notification, PageRun, PeerDisconnectedError, PeerHandle,
                         TransferBackend, TransferError, TransferTimeoutError, coalesce,
                         compat_hash)
from tests.kv_transfer.support import (NUM_PAGES, PAGE_BYTES, PEER_ROOM, BackendFactory,
                                       Pair, PeerProcess, open_endpoint, page_bytes_of,
                                       random_bytes, random_kv)

pytestmark = pytest.mark.timeout(60)
SpawnPeer = Callable[..., Awaitable[PeerProcess]]


def note(room: str, seq: int = 0, final: bool = True, generation: int = 1,
         payload: bytes = b"") -> Notification:
    return Notification(room, generation, seq, payload, final)


async def write_pages(pair: Pair, room: str, src: list[int], dst: list[int],
                      notification: Notification, timeout: float = 10.0) -> int:
    return await pair.sender.write(pair.peer, room, notification.generation, "kv",
                                   coalesce(src, dst), notification, timeout=timeout)


# ---------------------------------------------------------------- data movement


@pytest.mark.parametrize("num_senders", [1, 3])
async def test_many_rooms_at_once_land_byte_exact(
        pair: Pair, factory: BackendFactory, num_senders: int) -> None:
    rng = random.Random(num_senders)
    dst_order = rng.sample(range(NUM_PAGES), NUM_PAGES)
    rooms = [(f"room-{i}", rng.sample(range(NUM_PAGES), 12), dst_order[i * 12:(i + 1) * 12])
             for i in range(16)]
    before = pair.dst.clone()
    senders = [(pair.sender, pair.peer)]
    for _ in range(num_senders - 1):
        extra = await open_endpoint(factory, pair.src)
        senders.append((extra, await extra.connect(pair.receiver.descriptor(), timeout=5)))
    for room, _, dst in rooms:
        pair.receiver.reserve_room(room, 1, "kv", dst)

    async def send(i: int, room: str, src: list[int], dst: list[int]) -> None:
        backend, peer = senders[i % num_senders]
        for seq in range(3):  # three chunks of four pages, like chunked prefill
            part = slice(seq * 4, seq * 4 + 4)
            await backend.write(peer, room, 1, "kv", coalesce(src[part], dst[part]),
                                note(room, seq, seq == 2, payload=f"{room}/{seq}".encode()),
                                timeout=10)

    async def receive(room: str) -> list[Notification]:
        return [n async for n in pair.receiver.notifications(room, timeout=10)]

    try:
        results = await asyncio.gather(*(send(i, *r) for i, r in enumerate(rooms)),
                                       *(receive(r[0]) for r in rooms))
    finally:
        for backend, _ in senders[1:]:
            await backend.close()
    for (room, src, dst), got in zip(rooms, results[len(rooms):]):
        assert [(n.seq, n.final) for n in got] == [(0, False), (1, False), (2, True)]
        assert [n.payload for n in got] == [f"{room}/{s}".encode() for s in range(3)]
        assert page_bytes_of(pair.dst, dst) == page_bytes_of(pair.src, src)
    untouched = sorted(set(range(NUM_PAGES)) - {p for r in rooms for p in r[2]})
    assert page_bytes_of(pair.dst, untouched) == page_bytes_of(before, untouched)


async def test_coalesced_runs_copy_the_same_bytes_as_single_pages(pair: Pair) -> None:
    src = [10, 11, 12, 13, 40, 41, 7]
    dst = [100, 101, 102, 103, 50, 51, 8]
    runs = coalesce(src, dst)
    assert runs == [PageRun(10, 100, 4), PageRun(40, 50, 2), PageRun(7, 8, 1)]
    pair.receiver.reserve_room("r", 1, "kv", dst)
    sent = await write_pages(pair, "r", src, dst, note("r"))
    assert sent == len(src) * PAGE_BYTES
    assert page_bytes_of(pair.dst, dst) == page_bytes_of(pair.src, src)


async def test_notifications_come_in_seq_order_and_stop_after_final(pair: Pair) -> None:
    pair.receiver.reserve_room("r", 1, "kv", [0, 1])
    # Chunk 1 lands before chunk 0: the receiver still hands out 0 first.
    await write_pages(pair, "r", [5], [1], note("r", 1, False, payload=b"one"))
    await write_pages(pair, "r", [4], [0], note("r", 0, False, payload=b"zero"))
    await write_pages(pair, "r", [], [], note("r", 2, True, payload=b"end"))  # note only
    got = [n async for n in pair.receiver.notifications("r", timeout=5)]
    assert [(n.seq, n.final, n.payload) for n in got] == [
        (0, False, b"zero"), (1, False, b"one"), (2, True, b"end")]
    assert page_bytes_of(pair.dst, [0, 1]) == page_bytes_of(pair.src, [4, 5])
    with pytest.raises(TransferError):  # nothing after the final chunk
        await write_pages(pair, "r", [6], [0], note("r", 3, True))
    with pytest.raises(TransferError):  # each seq once
        await write_pages(pair, "r", [6], [0], note("r", 1, False))
    assert page_bytes_of(pair.dst, [0, 1]) == page_bytes_of(pair.src, [4, 5])


async def test_wait_final_skips_intermediate_chunks(pair: Pair) -> None:
    pair.receiver.reserve_room("r", 7, "kv", [3, 4])
    await write_pages(pair, "r", [0], [3], note("r", 0, False, generation=7))
    await write_pages(pair, "r", [1], [4], note("r", 1, True, generation=7, payload=b"t"))
    final = await pair.receiver.wait_final("r", timeout=5)
    assert (final.seq, final.final, final.payload, final.generation) == (1, True, b"t", 7)


async def test_large_concurrent_writes_interleave_byte_exact(
        factory: BackendFactory) -> None:
    # Four 8 MiB writes share one connection at once (several frames each).
    page = 1 << 20
    src = random_bytes(32 * page, seed=11).reshape(32, page).to(factory.device)
    dst = torch.zeros_like(src)
    sender = await open_endpoint(factory, src)
    receiver = await open_endpoint(factory, dst)
    try:
        peer = await sender.connect(receiver.descriptor(), timeout=5)
        order = random.Random(3).sample(range(32), 32)
        for i in range(4):
            receiver.reserve_room(f"big-{i}", 1, "kv", order[i * 8:(i + 1) * 8])
        await asyncio.gather(*(
            sender.write(peer, f"big-{i}", 1, "kv",
                         coalesce(range(i * 8, i * 8 + 8), order[i * 8:(i + 1) * 8]),
                         note(f"big-{i}"), timeout=20) for i in range(4)))
        assert torch.equal(dst[order], src)
        assert sender.bytes_sent_total == receiver.bytes_received_total == 32 * page
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.large_transfer
async def test_256_mib_transfer_is_byte_exact(factory: BackendFactory) -> None:
    # Llama-3.1-8B geometry: 128 pages of 16 tokens x 128 KiB/token = 256 MiB.
    shape = (128, 32, 2, 16, 8, 128)
    src = random_bytes(256 << 20, seed=21).view(torch.bfloat16).reshape(shape)
    dst = torch.zeros(shape, dtype=torch.bfloat16, device=factory.device)
    sender = await open_endpoint(factory, src.to(factory.device))
    receiver = await open_endpoint(factory, dst)
    try:
        peer = await sender.connect(receiver.descriptor(), timeout=5)
        blocks = [list(range(b, b + 8)) for b in range(0, 128, 8)]
        random.Random(5).shuffle(blocks)
        dst_pages = [p for block in blocks for p in block]
        receiver.reserve_room("big", 1, "kv", dst_pages)
        chunks = [coalesce(range(c, c + 32), dst_pages[c:c + 32]) for c in range(0, 128, 32)]
        await asyncio.gather(*(
            sender.write(peer, "big", 1, "kv", runs, note("big", i, i == 3), timeout=60)
            for i, runs in enumerate(chunks)))
        await receiver.wait_final("big", timeout=10)
        landed = dst.cpu().view(torch.uint8)
        expected = src.view(torch.uint8)
        for run in (r for runs in chunks for r in runs):
            assert torch.equal(landed[run.dst_page:run.dst_page + run.num_pages],
                               expected[run.src_page:run.src_page + run.num_pages])
        assert receiver.bytes_received_total == 256 << 20
    finally:
        await sender.close()
        await receiver.close()


# -------------------------------------------------------------------- fencing


async def test_write_outside_room_pages_is_fenced(pair: Pair) -> None:
    pair.receiver.reserve_room("r", 1, "kv", [0, 1, 2, 3])
    before = pair.dst.clone()
    with pytest.raises(FencingError):  # pages 4 and 5 belong to nobody
        await write_pages(pair, "r", list(range(6)), [0, 1, 2, 3, 4, 5], note("r"))
    with pytest.raises(FencingError):  # past the end of the region
        await pair.sender.write(pair.peer, "r", 1, "kv", [PageRun(0, NUM_PAGES, 1)],
                                note("r"), timeout=5)
    with pytest.raises(FencingError):
        await write_pages(pair, "no-such-room", [0], [0], note("no-such-room"))
    assert torch.equal(pair.dst.view(torch.uint8), before.view(torch.uint8))
    # Refused writes consumed nothing: the room still takes its seq 0.
    await write_pages(pair, "r", [9, 8], [0, 1], note("r"))
    assert page_bytes_of(pair.dst, [0, 1]) == page_bytes_of(pair.src, [9, 8])


async def test_stale_generation_is_fenced(pair: Pair) -> None:
    pair.receiver.reserve_room("r", 1, "kv", [0, 1])
    pair.receiver.reserve_room("r", 2, "kv", [0, 1])  # fences generation 1
    before = pair.dst.clone()
    with pytest.raises(FencingError, match="generation"):
        await write_pages(pair, "r", [5, 6], [0, 1], note("r", generation=1))
    assert torch.equal(pair.dst.view(torch.uint8), before.view(torch.uint8))
    await write_pages(pair, "r", [5, 6], [0, 1], note("r", generation=2))
    assert page_bytes_of(pair.dst, [0, 1]) == page_bytes_of(pair.src, [5, 6])
    with pytest.raises(ValueError):  # generations only move forward
        pair.receiver.reserve_room("r", 2, "kv", [0, 1])
    with pytest.raises(ValueError):  # a page belongs to one live room
        pair.receiver.reserve_room("other", 1, "kv", [1, 2])


async def test_release_room_aborts_an_in_flight_write(factory: BackendFactory) -> None:
    page = 2 << 20
    src = random_bytes(32 * page, seed=12).reshape(32, page).to(factory.device)
    dst = torch.zeros_like(src)
    sender = await open_endpoint(factory, src)
    receiver = await open_endpoint(factory, dst)
    try:
        peer = await sender.connect(receiver.descriptor(), timeout=5)
        receiver.reserve_room("r", 1, "kv", range(16))
        write = asyncio.create_task(sender.write(
            peer, "r", 1, "kv", [PageRun(0, 0, 16)], note("r"), timeout=10))
        deadline = time.monotonic() + 5
        while receiver.bytes_received_total == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0)
        receiver.release_room("r")
        landed = receiver.bytes_received_total
        with pytest.raises(FencingError):
            await write
        assert 0 < landed < 16 * page, "release must happen mid-transfer"
        await asyncio.sleep(0.05)
        assert receiver.bytes_received_total == landed  # nothing after the release
        assert int(dst[16:].count_nonzero()) == 0  # nothing outside the room
        # The connection survives the abort.
        receiver.reserve_room("r2", 1, "kv", [20])
        await sender.write(peer, "r2", 1, "kv", [PageRun(3, 20, 1)], note("r2"), timeout=5)
        assert torch.equal(dst[20], src[3])
    finally:
        await sender.close()
        await receiver.close()


# ------------------------------------------------------------ waits and peers


async def test_waits_time_out_and_release_wakes_waiters(pair: Pair) -> None:
    pair.receiver.reserve_room("r", 1, "kv", [0])
    start = time.monotonic()
    with pytest.raises(TransferTimeoutError):
        await pair.receiver.wait_notification("r", timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 0.7
    with pytest.raises(TransferTimeoutError):
        await pair.receiver.wait_final("r", timeout=0.1)
    with pytest.raises(FencingError):
        await pair.receiver.wait_notification("unknown", timeout=1)
    waiter = asyncio.create_task(pair.receiver.wait_notification("r", timeout=10))
    await asyncio.sleep(0.05)
    pair.receiver.release_room("r")
    with pytest.raises(FencingError):
        await asyncio.wait_for(waiter, 1)


async def test_lost_sender_fails_its_unfinished_room(pair: Pair) -> None:
    pair.receiver.reserve_room("r", 1, "kv", [0, 1])
    await write_pages(pair, "r", [0], [0], note("r", 0, False))
    assert (await pair.receiver.wait_notification("r", timeout=5)).seq == 0
    await pair.peer.close()
    start = time.monotonic()
    with pytest.raises(PeerDisconnectedError):
        await pair.receiver.wait_notification("r", timeout=5)
    assert time.monotonic() - start < 2
    with pytest.raises(PeerDisconnectedError):
        await write_pages(pair, "r", [1], [1], note("r", 1, True))


async def test_compat_hash_mismatch_is_refused(pair: Pair, factory: BackendFactory) -> None:
    other_hash = compat_hash(model="another-model", dtype="float16")
    other = await open_endpoint(factory, random_kv(8, seed=3, device=factory.device),
                                compat=other_hash)
    try:
        with pytest.raises(IncompatiblePeerError) as refused:
            await pair.sender.connect(other.descriptor(), timeout=5)
        assert other_hash in str(refused.value) and pair.sender.compat_hash in str(refused.value)
        # A descriptor that lies about its hash is caught by the handshake.
        forged = dataclasses.replace(other.descriptor(), compat_hash=pair.sender.compat_hash)
        with pytest.raises(IncompatiblePeerError) as refused:
            await pair.sender.connect(forged, timeout=5)
        assert other_hash in str(refused.value)
        like_other = await open_endpoint(factory, random_kv(8, seed=4, device=factory.device),
                                     compat=other_hash)
        try:  # the refusing endpoint still serves compatible peers
            assert (await like_other.connect(other.descriptor(), timeout=5)).connected
        finally:
            await like_other.close()
    finally:
        await other.close()


async def test_descriptor_is_json_safe_and_counters_add_up(pair: Pair) -> None:
    desc = pair.receiver.descriptor()
    assert EndpointDescriptor.from_dict(json.loads(json.dumps(desc.to_dict()))) == desc
    assert desc.region("kv").page_bytes == PAGE_BYTES
    pair.receiver.reserve_room("r", 1, "kv", range(10))
    sent = await write_pages(pair, "r", list(range(10)), list(range(10)), note("r"))
    assert sent == pair.sender.bytes_sent_total == 10 * PAGE_BYTES
    assert pair.receiver.bytes_received_total == 10 * PAGE_BYTES
    assert pair.sender.transfer_seconds_total > 0
    assert pair.sender.stats().bytes_sent_total == 10 * PAGE_BYTES


# ------------------------------------------------- peers in a separate process

KILL_PAGES = (64 << 20) // PAGE_BYTES  # a 64 MiB write cannot fit in socket buffers


async def test_peer_killed_mid_transfer_errors_within_timeout(
        factory: BackendFactory, peer_processes: SpawnPeer) -> None:
    peer = await peer_processes(factory, KILL_PAGES)
    sender = await open_endpoint(factory, random_kv(KILL_PAGES, seed=6, device=factory.device))
    try:
        handle = await sender.connect(peer.descriptor, timeout=10)
        peer.signal(signal.SIGSTOP)  # freeze the receiver so the write stalls midway
        await asyncio.sleep(0.1)
        timeout = 5.0
        write = asyncio.create_task(sender.write(
            handle, PEER_ROOM, 1, "kv", [PageRun(0, 0, KILL_PAGES)],
            note(PEER_ROOM, 0, False, payload=b"[]"), timeout=timeout))
        await asyncio.sleep(0.3)
        assert not write.done()
        await peer.kill()
        killed_at = time.monotonic()
        with pytest.raises(PeerDisconnectedError):
            await write
        assert time.monotonic() - killed_at < 2.0 < timeout
        assert not handle.connected
    finally:
        await sender.close()


async def test_hung_peer_times_out(factory: BackendFactory, peer_processes: SpawnPeer) -> None:
    peer = await peer_processes(factory, KILL_PAGES)
    sender = await open_endpoint(factory, random_kv(KILL_PAGES, seed=7, device=factory.device))
    try:
        handle = await sender.connect(peer.descriptor, timeout=10)
        peer.signal(signal.SIGSTOP)
        await asyncio.sleep(0.1)
        start = time.monotonic()
        with pytest.raises(TransferTimeoutError):
            await sender.write(handle, PEER_ROOM, 1, "kv", [PageRun(0, 0, KILL_PAGES)],
                               note(PEER_ROOM, 0, False, payload=b"[]"), timeout=1.0)
        assert 1.0 <= time.monotonic() - start < 1.0 + 1.0  # timeout + margin
        fresh = await open_endpoint(factory, random_kv(4, seed=8, device=factory.device))
        try:  # the frozen peer never answers the handshake
            start = time.monotonic()
            with pytest.raises(TransferTimeoutError):
                await fresh.connect(peer.descriptor, timeout=0.5)
            assert time.monotonic() - start < 0.5 + 1.0
        finally:
            await fresh.close()
    finally:
        await sender.close()


async def write_and_check(sender: TransferBackend, handle: PeerHandle, peer: PeerProcess,
                          src_kv: torch.Tensor, src: list[int], dst: list[int]) -> None:
    """Write ``src`` pages into the peer process's ``dst`` pages; the peer
    reports the sha256 of what landed."""
    await sender.write(handle, PEER_ROOM, 1, "kv", coalesce(src, dst),
                       note(PEER_ROOM, 0, False, payload=json.dumps(dst).encode()),
                       timeout=10)
    report = await peer.next_report()
    assert report == {"seq": 0, "sha256": sha256(page_bytes_of(src_kv, src)).hexdigest()}


async def test_reconnect_after_peer_restarts(factory: BackendFactory,
                                             peer_processes: SpawnPeer) -> None:
    src = random_kv(64, seed=9, device=factory.device)
    sender = await open_endpoint(factory, src)
    try:
        first = await peer_processes(factory, 64)
        handle = await sender.connect(first.descriptor, timeout=10)
        await write_and_check(sender, handle, first, src, list(range(8)), list(range(8, 16)))
        await first.kill()
        deadline = time.monotonic() + 2
        while handle.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not handle.connected
        with pytest.raises(PeerDisconnectedError):
            await sender.write(handle, PEER_ROOM, 1, "kv", [PageRun(0, 0, 1)],
                               note(PEER_ROOM, 1, False, payload=b"[0]"), timeout=5)
        same = factory.same_address(first.descriptor) if factory.same_address else {}
        second = await peer_processes(factory, 64, same)
        if same:
            assert second.descriptor.address == first.descriptor.address
        new_handle = await sender.connect(second.descriptor, timeout=10)
        assert new_handle is not handle and new_handle.connected
        await write_and_check(sender, new_handle, second, src, [20, 3, 4], [0, 1, 2])
    finally:
        await sender.close()
