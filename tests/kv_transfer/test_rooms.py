"""RoomTable: the receiver-side fencing and ordering every backend reuses."""

from __future__ import annotations

import pytest

from kv_transfer import (FencingError, Notification, PageRun, PeerDisconnectedError,
                         RegionSpec, TransferError)
from kv_transfer.base import TransferTimeoutError
from kv_transfer.rooms import RoomTable

KV = RegionSpec("kv", 16 * 64, 64)  # 16 pages


def note(seq: int, final: bool = False, room: str = "r", gen: int = 1) -> Notification:
    return Notification(room, gen, seq, b"", final)


def test_reserve_validates_pages_and_generations() -> None:
    table = RoomTable()
    table.reserve("a", 1, KV, [0, 1])
    with pytest.raises(ValueError, match="outside region"):
        table.reserve("b", 1, KV, [16])
    with pytest.raises(ValueError, match="already reserved by room 'a'"):
        table.reserve("b", 1, KV, [1, 2])
    with pytest.raises(ValueError, match="not newer"):
        table.reserve("a", 1, KV, [0, 1])
    table.reserve("z", 1, KV, [4])
    with pytest.raises(ValueError, match="already reserved by room 'z'"):
        table.reserve("a", 2, KV, [0, 4, 5])
    assert table.is_live("a", 1)  # a refused re-reservation leaves the old one alone
    table.reserve("a", 2, KV, [5])  # replaces generation 1, frees pages 0 and 1
    table.reserve("b", 1, KV, [0, 1])
    table.release("a")
    table.release("a")  # idempotent
    table.reserve("c", 1, KV, [5])


async def test_admit_then_release_kills_the_ticket() -> None:
    table = RoomTable()
    table.reserve("r", 1, KV, [3, 4])
    aborted: list[TransferError] = []
    ticket = table.admit(note(0), "kv", [PageRun(0, 3, 2)], writer="w",
                         on_abort=aborted.append)
    assert ticket.live and table.is_live("r", 1)
    table.release("r")
    assert not ticket.live and isinstance(aborted[0], FencingError)
    with pytest.raises(FencingError):
        ticket.finish(table)


async def test_admit_refuses_before_anything_lands() -> None:
    table = RoomTable()
    table.reserve("r", 2, KV, [3, 4])
    with pytest.raises(FencingError, match="pages \\[5\\]"):
        table.admit(note(0, gen=2), "kv", [PageRun(0, 3, 3)], "w", lambda e: None)
    with pytest.raises(FencingError, match="stale generation 1"):
        table.admit(note(0, gen=1), "kv", [PageRun(0, 3, 1)], "w", lambda e: None)
    with pytest.raises(FencingError, match="unknown"):
        table.admit(note(0, room="x"), "kv", [], "w", lambda e: None)


async def test_out_of_order_chunks_are_delivered_in_order() -> None:
    table = RoomTable()
    table.reserve("r", 1, KV, [0])
    for seq in (2, 0, 1):
        table.admit(note(seq, final=seq == 2), "kv", [], "w", lambda e: None).finish(table)
    got = [await table.next_notification("r", 1) for _ in range(3)]
    assert [(n.seq, n.final) for n in got] == [(0, False), (1, False), (2, True)]
    with pytest.raises(TransferError, match="already delivered"):
        await table.next_notification("r", 1)


async def test_seq_rules() -> None:
    table = RoomTable()
    table.reserve("r", 1, KV, [0])
    ticket = table.admit(note(0), "kv", [], "w", lambda e: None)
    with pytest.raises(TransferError, match="twice"):
        table.admit(note(0), "kv", [], "w", lambda e: None)
    ticket.abandon()  # the sender gave up: seq 0 may be sent again
    table.admit(note(0), "kv", [], "w", lambda e: None).finish(table)
    table.admit(note(3, final=True), "kv", [], "w", lambda e: None)
    with pytest.raises(TransferError, match="after the final"):
        table.admit(note(4), "kv", [], "w", lambda e: None)
    with pytest.raises(TransferError, match="twice"):
        table.deliver(note(0))  # one-sided backends deliver directly


async def test_lost_writer_fails_only_its_unfinished_rooms() -> None:
    table = RoomTable()
    for room, page in (("open", 0), ("done", 1), ("other", 2)):
        table.reserve(room, 1, KV, [page])
    table.admit(note(0, room="open"), "kv", [], "w1", lambda e: None).finish(table)
    table.admit(note(0, True, room="done"), "kv", [], "w1", lambda e: None).finish(table)
    table.admit(note(0, room="other"), "kv", [], "w2", lambda e: None).finish(table)
    table.writer_lost("w1")
    assert (await table.next_notification("open", 1)).seq == 0  # landed before the loss
    with pytest.raises(PeerDisconnectedError):
        await table.next_notification("open", 1)
    assert (await table.next_notification("done", 1)).final
    assert (await table.next_notification("other", 1)).seq == 0
    with pytest.raises(TransferTimeoutError):
        await table.next_notification("other", 0.05)
