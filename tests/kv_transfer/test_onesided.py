"""The one-sided layer under mooncake, nixl and cuda_ipc: slicing, control wire,
sender-side fencing, drains, hostile control clients, availability.

Endpoint tests run against the real libraries on CPU (``ONE_SIDED`` backends
available here); the conformance suite covers the rest of the contract.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import torch

from kv_transfer import (FencingError, Notification, PageRun, RoomReservation,
                         TransferError, backend_availability, coalesce, create_backend)
from kv_transfer.control_wire import HEADER, ProtocolError
from kv_transfer.onesided import OneSidedBackend
from kv_transfer.onesided_engine import CompletionPoller, Segment, plan_slices
from kv_transfer.onesided_session import InFlight
from kv_transfer.onesided_wire import (ControlFrame, Hello, HelloReply, decode_reservation,
                                       encode_reservation, page_ranges, unpack_fields)
from tests.kv_transfer.support import (COMPAT, NUM_PAGES, factory_for, open_endpoint,
                                       page_bytes_of, random_bytes, random_kv)

pytestmark = pytest.mark.timeout(60)
ONE_SIDED = [pytest.param(name, marks=pytest.mark.skipif(
    backend_availability()[name] is not None, reason=str(backend_availability()[name])))
    for name in ("mooncake", "nixl")]


# ----------------------------------------------------------------- pure parts


def test_plan_slices_cuts_runs_at_slice_bytes() -> None:
    runs = [PageRun(0, 10, 3), PageRun(7, 2, 1)]
    assert plan_slices(runs, page_bytes=4, slice_bytes=5) == [
        [Segment(0, 40, 5)], [Segment(5, 45, 5)], [Segment(10, 50, 2), Segment(28, 8, 3)],
        [Segment(31, 11, 1)]]
    assert plan_slices(runs, page_bytes=4, slice_bytes=1 << 20) == [
        [Segment(0, 40, 12), Segment(28, 8, 4)]]
    assert plan_slices([], page_bytes=4, slice_bytes=8) == []


async def test_completion_poller_resolves_fails_and_forgets_cancelled_waits() -> None:
    poller = CompletionPoller(0.001)
    polls = {"slow": 0, "abandoned": 0}

    def slow() -> bool:
        polls["slow"] += 1
        return polls["slow"] >= 3

    def broken() -> bool:
        raise TransferError("engine says no")

    def abandoned() -> bool:
        polls["abandoned"] += 1
        return False

    landed, failed, gave_up = poller.track(slow), poller.track(broken), poller.track(abandoned)
    await asyncio.wait_for(landed, 1)
    assert polls["slow"] == 3
    with pytest.raises(TransferError, match="engine says no"):
        await asyncio.wait_for(failed, 1)
    gave_up.cancel()
    await asyncio.sleep(0.02)
    seen = polls["abandoned"]
    await asyncio.sleep(0.02)
    assert polls["abandoned"] == seen  # no longer polled
    await poller.close()


def test_control_bodies_round_trip_and_reject_garbage() -> None:
    hello = Hello(1, "nixl", "abc", {"id": "agent-1"})
    assert Hello.decode(hello.encode()) == hello
    reply = HelloReply(False, "def", {"regions": {"kv": {"address": 4096}}})
    assert HelloReply.decode(reply.encode()) == reply
    reservation = RoomReservation("r", 7, "kv", frozenset([1, 2, 3, 9, 11, 12]))
    assert page_ranges(reservation.page_ids) == [(1, 3), (9, 1), (11, 2)]
    assert decode_reservation(encode_reservation(reservation), 64) == reservation
    with pytest.raises(ProtocolError):  # a receiver cannot make us build huge sets
        decode_reservation(encode_reservation(reservation), 5)
    with pytest.raises(ProtocolError):
        unpack_fields(hello.encode()[:-1], 3, 2)
    with pytest.raises(ProtocolError):
        Hello.decode(hello.encode() + b"x")


@dataclass(eq=False)
class _Session:
    sender_id: str
    finished: list[int]

    def finish(self, req_id: int) -> None:
        self.finished.append(req_id)


async def test_engine_notifications_finish_only_their_own_write() -> None:
    inflight = InFlight()
    session = _Session("agent-a", [])
    inflight.expect(("r", 1, 0), session, 5)  # type: ignore[arg-type]
    assert inflight.active.is_set()
    inflight.deliver("agent-b", Notification("r", 1, 0).encode())  # another sender
    inflight.deliver("agent-a", Notification("r", 2, 0).encode())  # stale generation
    inflight.deliver("agent-a", b"\x07garbage")
    assert session.finished == []
    inflight.deliver("agent-a", Notification("r", 1, 0, b"p", final=True).encode())
    assert session.finished == [5]
    inflight.forget(("r", 1, 0))
    assert not inflight.active.is_set()


async def test_drains_block_overlapping_pages_until_the_sender_stops() -> None:
    inflight = InFlight()
    old = _Session("a", [])
    inflight.drain(old, 1, "kv", frozenset({3, 4}), timeout=5)  # type: ignore[arg-type]
    assert inflight.blocked("kv", frozenset({4, 9})) and not inflight.blocked("kv", frozenset({9}))
    waiter = asyncio.create_task(inflight.wait_unblocked("kv", frozenset({4})))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    inflight.drained(old, 1)  # type: ignore[arg-type]
    await asyncio.wait_for(waiter, 1)
    inflight.drain(old, 2, "kv", frozenset({4}), timeout=0.05)  # type: ignore[arg-type]
    await asyncio.wait_for(inflight.wait_unblocked("kv", frozenset({4})), 1)  # expires


# ------------------------------------------------------------- real endpoints


@pytest.fixture(params=ONE_SIDED)
async def endpoints(request: pytest.FixtureRequest) -> AsyncIterator[
        tuple[OneSidedBackend, OneSidedBackend]]:
    factory = factory_for(request.param)
    sender = await open_endpoint(factory, random_kv(NUM_PAGES, seed=1))
    receiver = await open_endpoint(factory, random_kv(NUM_PAGES, seed=2))
    assert isinstance(sender, OneSidedBackend) and isinstance(receiver, OneSidedBackend)
    try:
        yield sender, receiver
    finally:
        await sender.close()
        await receiver.close()


async def test_sender_checks_its_runs_against_the_receivers_reservation(
        endpoints: tuple[OneSidedBackend, OneSidedBackend],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sender, receiver = endpoints
    peer = await sender.connect(receiver.descriptor(), timeout=5)
    receiver.reserve_room("r", 1, "kv", [0, 1])
    dst = receiver.regions["kv"].tensor
    before = dst.clone()
    honest = receiver.rooms.reservation
    # A receiver whose GO names fewer pages than it admitted (a bug, a stale
    # table): the sender must not post on the strength of its own runs.
    monkeypatch.setattr(receiver.rooms, "reservation",
                        lambda room: RoomReservation(room, 1, "kv", frozenset({0})))
    with pytest.raises(FencingError, match="not reserved"):
        await sender.write(peer, "r", 1, "kv", coalesce([5, 6], [0, 1]),
                           Notification("r", 1, 0), timeout=5)
    assert torch.equal(dst.view(torch.uint8), before.view(torch.uint8))
    monkeypatch.setattr(receiver.rooms, "reservation", honest)
    await asyncio.sleep(0.05)  # the CANCEL gave seq 0 back
    await sender.write(peer, "r", 1, "kv", coalesce([5, 6], [0, 1]),
                       Notification("r", 1, 0), timeout=5)
    src = sender.regions["kv"].tensor
    assert page_bytes_of(dst, [0, 1]) == page_bytes_of(src, [5, 6])


@pytest.mark.parametrize("name", ONE_SIDED)
async def test_a_late_slice_cannot_land_on_the_next_rooms_bytes(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A failed prefill's room is released and the same pages are re-reserved for
    # a retry at once (decode_worker does this). The first writer's second slice
    # is held back, as on a slow link: it lands after the release. The retry
    # must not be sent GO before that writer has stopped, or the late slice
    # would overwrite the retry's bytes.
    factory = factory_for(name)
    page = 1 << 20
    src = random_bytes(32 * page, seed=31).reshape(32, page)
    dst = torch.zeros(16, page, dtype=torch.uint8)
    slow = await open_endpoint(factory, src, slice_bytes=4 * page)
    retrier = await open_endpoint(factory, src)
    receiver = await open_endpoint(factory, dst)
    assert isinstance(slow, OneSidedBackend)
    held = asyncio.Event()
    copies = 0
    real_copy = slow.engine.copy

    async def slow_copy(*args: object) -> None:
        nonlocal copies
        copies += 1
        if copies == 2:
            await held.wait()
        await real_copy(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(slow.engine, "copy", slow_copy)
    try:
        first_peer = await slow.connect(receiver.descriptor(), timeout=5)
        retry_peer = await retrier.connect(receiver.descriptor(), timeout=5)
        receiver.reserve_room("req#1", 1, "kv", range(16))
        first = asyncio.create_task(slow.write(first_peer, "req#1", 1, "kv",
                                               [PageRun(0, 0, 16)],
                                               Notification("req#1", 1, 0), timeout=10))
        deadline = time.monotonic() + 5
        while receiver.bytes_received_total == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        receiver.release_room("req#1")
        receiver.reserve_room("req#2", 2, "kv", range(16))
        retry = asyncio.create_task(retrier.write(retry_peer, "req#2", 2, "kv",
                                                  [PageRun(16, 0, 16)],
                                                  Notification("req#2", 2, 0), timeout=10))
        await asyncio.sleep(0.3)
        assert not retry.done(), "the retry was let in while a fenced slice was in flight"
        held.set()  # the late slice lands now
        with pytest.raises(FencingError):
            await first
        await retry
        assert torch.equal(dst, src[16:])
    finally:
        for backend in (slow, retrier, receiver):
            await backend.close()


@pytest.mark.parametrize("name", ONE_SIDED)
async def test_a_write_keeps_up_to_max_inflight_slices_posted(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The next slice is posted while earlier ones are still landing (so the link
    # does not idle while the sender notices a landed slice), never more than
    # max_inflight_slices; a slice that carries an in-band notification is
    # posted only once every earlier slice has landed.
    factory = factory_for(name)
    page = 1 << 20
    src = random_bytes(16 * page, seed=41).reshape(16, page)
    dst = torch.zeros_like(src)
    sender = await open_endpoint(factory, src, slice_bytes=2 * page, max_inflight_slices=3)
    receiver = await open_endpoint(factory, dst)
    assert isinstance(sender, OneSidedBackend)
    in_flight, peak, with_notification = 0, 0, []
    real_copy = sender.engine.copy

    async def counted_copy(target: object, local: object, segments: object,
                           note: Notification | None) -> None:
        nonlocal in_flight, peak
        if note is not None:
            with_notification.append(in_flight)
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.01)  # a slow link: slices overlap
            await real_copy(target, local, segments, note)  # type: ignore[arg-type]
        finally:
            in_flight -= 1

    monkeypatch.setattr(sender.engine, "copy", counted_copy)
    try:
        peer = await sender.connect(receiver.descriptor(), timeout=5)
        receiver.reserve_room("r", 1, "kv", range(16))
        await sender.write(peer, "r", 1, "kv", [PageRun(0, 0, 16)],
                           Notification("r", 1, 0, final=True), timeout=20)
        await receiver.wait_notification("r", timeout=5)
    finally:
        await sender.close()
        await receiver.close()
    assert peak == 3
    assert with_notification == ([0] if sender.engine.in_band_notifications else [])
    assert torch.equal(dst, src)
    assert receiver.bytes_received_total == 16 * page


async def _raw_control(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def test_hostile_control_clients_do_not_hurt_the_receiver(
        endpoints: tuple[OneSidedBackend, OneSidedBackend]) -> None:
    sender, receiver = endpoints
    address = receiver.descriptor().address
    garbage = [
        HEADER.pack(99, 0, 0),  # unknown frame type
        HEADER.pack(ControlFrame.BEGIN, 1, 4) + b"abcd",  # BEGIN before HELLO
        HEADER.pack(ControlFrame.HELLO, 0, 1 << 40),  # absurd length
        HEADER.pack(ControlFrame.HELLO, 0, 5) + b"\x00\x01\xff\xff\xff",  # truncated
    ]
    for frames in garbage:
        reader, writer = await _raw_control(address)
        writer.write(frames)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # dropped, no reply
        writer.close()
    reader, writer = await _raw_control(address)  # wrong hash: refused politely
    body = Hello(1, receiver.name, "0" * 64, {}).encode()
    writer.write(HEADER.pack(ControlFrame.HELLO, 0, len(body)) + body)
    header = await asyncio.wait_for(reader.readexactly(HEADER.size), 5)
    reply = HelloReply.decode(await reader.readexactly(HEADER.unpack(header)[2]))
    assert not reply.ok and reply.info == {} and reply.compat_hash == COMPAT
    writer.close()
    peer = await sender.connect(receiver.descriptor(), timeout=5)  # still serving
    receiver.reserve_room("r", 1, "kv", [3])
    await sender.write(peer, "r", 1, "kv", [PageRun(1, 3, 1)], Notification("r", 1, 0))


@pytest.mark.parametrize("name", ONE_SIDED)
async def test_the_event_loop_keeps_running_during_large_writes(name: str) -> None:
    factory = factory_for(name)
    src = random_bytes(64 << 20, seed=33).reshape(32, 2 << 20)
    sender = await open_endpoint(factory, src)
    receiver = await open_endpoint(factory, torch.zeros_like(src))
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        peer = await sender.connect(receiver.descriptor(), timeout=5)
        receiver.reserve_room("r", 1, "kv", range(32))
        for seq in range(4):  # 4 x 64 MiB
            await sender.write(peer, "r", 1, "kv", [PageRun(0, 0, 32)],
                               Notification("r", 1, seq), timeout=20)
    finally:
        ticker.cancel()
        await sender.close()
        await receiver.close()
    assert len(gaps) > 10 and max(gaps) < 0.25, f"event loop stalled {max(gaps):.3f}s"
    assert receiver.bytes_received_total == 4 * (64 << 20)


def _thread_ticks(tids: set[str]) -> int:
    """User + system clock ticks of this process's threads ``tids``."""
    ticks = 0
    for tid in tids:
        try:
            fields = open(f"/proc/self/task/{tid}/stat").read().rpartition(")")[2].split()
        except FileNotFoundError:
            continue  # the thread ended
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


@pytest.mark.skipif(backend_availability()["nixl"] is not None or
                    not os.path.isdir("/proc/self/task"),
                    reason="needs nixl and Linux /proc")
async def test_the_nixl_progress_thread_sleeps_while_idle() -> None:
    # NIXL's Python API would make its progress thread poll() with a zero
    # timeout: a busy loop that takes a whole core. Ours waits for events.
    before = set(os.listdir("/proc/self/task"))
    backend = await open_endpoint(factory_for("nixl"), random_kv(4, seed=42))
    try:
        threads = set(os.listdir("/proc/self/task")) - before
        assert threads, "the nixl backend started no progress thread"
        start = _thread_ticks(threads)
        await asyncio.sleep(1.0)
        used = (_thread_ticks(threads) - start) / os.sysconf("SC_CLK_TCK")
    finally:
        await backend.close()
    assert used < 0.2, f"nixl's threads used {used:.2f} s of CPU in 1 s of idling"


# ---------------------------------------------------------------- availability


def test_every_backend_is_listed_with_its_availability() -> None:
    availability = backend_availability()
    assert set(availability) >= {"tcp", "mooncake", "nixl", "cuda_ipc"}
    assert availability["tcp"] is None
    if not torch.cuda.is_available():
        assert "CUDA" in str(availability["cuda_ipc"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
async def test_cuda_ipc_without_cuda_fails_clearly_at_start() -> None:
    backend = create_backend("cuda_ipc", compat_hash=COMPAT)
    with pytest.raises(TransferError, match="needs CUDA"):
        await backend.start()


@pytest.mark.parametrize("name, module", [("mooncake", "mooncake"), ("nixl", "nixl")])
def test_a_missing_package_fails_clearly_when_the_backend_is_created(
        name: str, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(TransferError, match="pip install"):
        create_backend(name, compat_hash=COMPAT)


def test_bad_engine_options_are_refused() -> None:
    with pytest.raises(ValueError, match="max_inflight_slices"):
        create_backend("mooncake", compat_hash=COMPAT, max_inflight_slices=0)
    with pytest.raises(ValueError, match="progress_wake_us"):
        create_backend("nixl", compat_hash=COMPAT, progress_wake_us=0)
    with pytest.raises(ValueError, match="device_name"):
        create_backend("mooncake", compat_hash=COMPAT, protocol="rdma")
    with pytest.raises(ValueError, match="protocol"):
        create_backend("mooncake", compat_hash=COMPAT, protocol="ib")
    with pytest.raises(TypeError):
        create_backend("nixl", compat_hash=COMPAT, no_such_option=1)
