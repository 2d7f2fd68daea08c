"""Unit tests of the plain-data part of the interface."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from kv_transfer import (EndpointDescriptor, FencingError, Notification, PageRun,
                         RegionSpec, RoomReservation, available_backends, coalesce,
                         compat_hash, create_backend, register_backend)
from kv_transfer.base import region_spec_for


class TestCoalesce:
    def test_merges_pages_adjacent_on_both_sides(self) -> None:
        assert coalesce([4, 5, 6, 9], [0, 1, 2, 3]) == [PageRun(4, 0, 3), PageRun(9, 3, 1)]

    def test_adjacent_on_one_side_only_stays_split(self) -> None:
        assert coalesce([0, 1, 2], [5, 7, 8]) == [PageRun(0, 5, 1), PageRun(1, 7, 2)]
        assert coalesce([0, 2], [5, 6]) == [PageRun(0, 5, 1), PageRun(2, 6, 1)]

    def test_keeps_order_and_never_merges_backwards(self) -> None:
        assert coalesce([3, 2, 1], [3, 2, 1]) == [PageRun(3, 3, 1), PageRun(2, 2, 1),
                                                  PageRun(1, 1, 1)]

    def test_one_long_run_and_empty(self) -> None:
        assert coalesce(range(100), range(50, 150)) == [PageRun(0, 50, 100)]
        assert coalesce([], []) == []

    def test_rejects_bad_input(self) -> None:
        with pytest.raises(ValueError):
            coalesce([1, 2], [1])
        with pytest.raises(ValueError):
            coalesce([-1], [0])


class TestNotificationEncoding:
    @pytest.mark.parametrize("note", [
        Notification("r", 0, 0),
        Notification("req-17#3", 2**64 - 1, 2**32 - 1, b"\x00\xff" * 100, True),
        Notification("ключ/房间", 5, 1, b"tok", False),
    ])
    def test_round_trip(self, note: Notification) -> None:
        assert Notification.decode(note.encode()) == note

    def test_is_compact_and_not_pickle(self) -> None:
        wire = Notification("room", 1, 2, b"xy", True).encode()
        assert len(wire) == 20 + 4 + 2
        assert not wire.startswith(b"\x80")  # no pickle protocol header

    def test_rejects_malformed_bytes(self) -> None:
        wire = Notification("room", 1, 2, b"xy", True).encode()
        with pytest.raises(ValueError):
            Notification.decode(wire[:-1])
        with pytest.raises(ValueError):
            Notification.decode(wire + b"z")
        with pytest.raises(ValueError):
            Notification.decode(b"\x09" + wire[1:])  # unknown version
        with pytest.raises(ValueError):
            Notification.decode(wire[:5])

    def test_rejects_out_of_range_fields(self) -> None:
        with pytest.raises(ValueError):
            Notification("r", -1, 0).encode()
        with pytest.raises(ValueError):
            Notification("r", 0, 2**32).encode()


def test_compat_hash_is_stable_and_sensitive() -> None:
    a = compat_hash(model="m", dtype="bf16", num_layers=32, page_size=16, tp="1")
    assert a == compat_hash(tp="1", page_size=16, num_layers=32, dtype="bf16", model="m")
    assert a != compat_hash(model="m", dtype="fp16", num_layers=32, page_size=16, tp="1")
    assert a != compat_hash(model="m", dtype="bf16", num_layers=32, page_size=16, tp="2")
    assert len(a) == 64 and int(a, 16) >= 0


def test_descriptor_round_trips_through_json() -> None:
    desc = EndpointDescriptor("tcp", "10.0.0.2:7000",
                              (RegionSpec("kv", 4096, 1024), RegionSpec("emb", 64, 8)), "h")
    assert EndpointDescriptor.from_dict(json.loads(json.dumps(desc.to_dict()))) == desc
    assert desc.region("emb").num_pages == 8
    with pytest.raises(KeyError):
        desc.region("missing")


def test_region_spec_from_tensor_pages_along_dim_0() -> None:
    kv = torch.zeros(10, 2, 2, 4, 2, 8, dtype=torch.bfloat16)
    spec = region_spec_for("kv", kv)
    assert (spec.nbytes, spec.page_bytes, spec.num_pages) == (10 * 512, 512, 10)
    assert region_spec_for("kv", kv, page_bytes=1024).num_pages == 5
    with pytest.raises(ValueError):
        region_spec_for("kv", kv.transpose(0, 1))
    with pytest.raises(ValueError):
        RegionSpec("kv", 1000, 300)


def test_room_reservation_checks_runs_and_round_trips() -> None:
    res = RoomReservation("r", 3, "kv", frozenset({4, 5, 6, 9}))
    res.check_runs("kv", [PageRun(0, 4, 3), PageRun(7, 9, 1)])
    with pytest.raises(FencingError, match="7"):
        res.check_runs("kv", [PageRun(0, 5, 3)])
    with pytest.raises(FencingError):
        res.check_runs("emb", [PageRun(0, 4, 1)])
    assert RoomReservation.from_dict(json.loads(json.dumps(res.to_dict()))) == res


def test_registry() -> None:
    assert "tcp" in available_backends()
    with pytest.raises(ValueError, match="unknown transfer backend"):
        create_backend("carrier-pigeon", compat_hash="x")
    with pytest.raises(ValueError, match="registered twice"):
        register_backend("tcp")(type("Dup", (), {}))  # type: ignore[arg-type]
    assert create_backend("tcp", compat_hash="x").name == "tcp"


def test_page_run_validation() -> None:
    with pytest.raises(ValueError):
        PageRun(0, 0, 0)
    with pytest.raises(ValueError):
        PageRun(0, -1, 1)
    assert list(PageRun(1, 7, 3).dst_pages) == [7, 8, 9]
    assert struct.calcsize("!BBHIQI") == 20  # the notification header size above
