"""``KEY=VALUE`` backend options: typed by the config field they set, checked against
the backend's config dataclass, with errors that say what is wrong."""

from __future__ import annotations

import asyncio

import pytest

from kv_transfer import (TransferError, TransferOptionError, backend_availability,
                         create_backend, option_fields, parse_transfer_options)
from kv_transfer.mooncake import MooncakeConfig
from kv_transfer.nixl import NixlConfig
from kv_transfer.tcp import TcpConfig


@pytest.mark.parametrize("backend, items, expected", [
    ("tcp", ["chunk_bytes=65536", "port=0"], {"chunk_bytes": 65536, "port": 0}),
    ("tcp", ["advertise_host=10.0.0.5", "handshake_timeout=2.5"],
     {"advertise_host": "10.0.0.5", "handshake_timeout": 2.5}),
    # Typed by the field, not the text: a device named "0" stays a string.
    ("mooncake", ["protocol=rdma", "device_name=0", "max_inflight_slices=8"],
     {"protocol": "rdma", "device_name": "0", "max_inflight_slices": 8}),
    ("mooncake", ["protocol=rdma", "device_name=mlx5_0,mlx5_1", "slice_bytes=1_048_576"],
     {"protocol": "rdma", "device_name": "mlx5_0,mlx5_1", "slice_bytes": 1 << 20}),
    ("nixl", ["progress_thread=ON", "num_workers=2", "ucx_devices=mlx5_0:1", "xfer_poll_s=1e-3"],
     {"progress_thread": True, "num_workers": 2, "ucx_devices": "mlx5_0:1", "xfer_poll_s": 0.001}),
    ("nixl", ["progress_thread=no", "drain_timeout_s=3"], {"progress_thread": False, "drain_timeout_s": 3.0}),
    ("cuda_ipc", ["copy_poll_s=0.001"], {"copy_poll_s": 0.001}),
    ("tcp", [], {}),
])
def test_values_take_the_type_of_their_field(backend: str, items: list[str], expected: dict) -> None:
    parsed = parse_transfer_options(backend, items)
    assert parsed == expected
    assert [type(v) for v in parsed.values()] == [type(v) for v in expected.values()]


@pytest.mark.parametrize("backend, items, message", [
    ("tcp", ["chunk_bytes"], "'chunk_bytes' is not KEY=VALUE"),
    ("tcp", ["=5"], "'=5' is not KEY=VALUE"),
    ("tcp", ["chunk_byte=5"], "unknown option 'chunk_byte' for transfer backend 'tcp'; valid keys: "
                              "advertise_host, chunk_bytes, handshake_timeout, host, port"),
    ("tcp", ["chunk_bytes=4MiB"], "chunk_bytes='4MiB': not a valid int"),
    ("tcp", ["chunk_bytes=1.5"], "chunk_bytes='1.5': not a valid int"),
    ("tcp", ["port=1", "port=2"], "'port' is given twice"),
    ("tcp", ["handshake_timeout=nan"], "handshake_timeout='nan': not a valid float"),
    ("nixl", ["progress_thread=maybe"], "progress_thread='maybe': not a valid bool"),
    ("mooncake", ["protocol=udp"], "mooncake protocol must be 'tcp' or 'rdma', got 'udp'"),
    ("mooncake", ["protocol=rdma"], "mooncake protocol 'rdma' needs device_name"),
    ("mooncake", ["protocol=rdma", "device_name= , "], "mooncake protocol 'rdma' needs device_name"),
    ("mooncake", ["device_name=mlx5_0"], "names an RDMA device, but protocol is 'tcp'"),
    ("mooncake", ["max_inflight_slices=0"], "max_inflight_slices must be positive, got 0"),
    ("nixl", ["slice_bytes=0"], "slice_bytes must be positive"),
])
def test_bad_options_are_refused_with_the_reason(backend: str, items: list[str], message: str) -> None:
    with pytest.raises(TransferOptionError) as info:
        parse_transfer_options(backend, items)
    assert message in str(info.value)


def test_reserved_fields_and_unknown_backends() -> None:
    with pytest.raises(TransferOptionError, match="'host' is set by the worker itself"):
        parse_transfer_options("tcp", ["host=0.0.0.0"], reserved=("host", "advertise_host"))
    # A reserved key is not offered as a valid one either.
    with pytest.raises(TransferOptionError) as info:
        parse_transfer_options("mooncake", ["hots=x"], reserved=("host", "advertise_host"))
    assert "valid keys: cancel_grace_s, device_name," in str(info.value)
    assert "host" not in str(info.value).split("valid keys:")[1]
    with pytest.raises(ValueError, match="unknown transfer backend 'rdma'"):
        parse_transfer_options("rdma", [])


def test_every_backend_exposes_its_config_fields() -> None:
    assert set(option_fields("tcp")) == {f for f in TcpConfig.__dataclass_fields__}
    assert {"protocol", "device_name", "slice_bytes"} <= set(option_fields("mooncake"))
    assert {"ucx_devices", "num_workers", "progress_thread"} <= set(option_fields("nixl"))
    assert MooncakeConfig(protocol="rdma", device_name="a, b").device_names == ["a", "b"]
    assert NixlConfig().progress_thread is True  # event-driven: it sleeps until UCX has work


@pytest.mark.skipif(backend_availability()["mooncake"] is not None, reason="mooncake not installed")
def test_mooncake_rdma_with_a_missing_device_fails_instead_of_falling_back_to_tcp() -> None:
    # Mooncake itself initializes "rdma" with a device that does not exist and then
    # moves bytes over TCP; the backend refuses to start instead.
    async def start() -> None:
        backend = create_backend("mooncake", compat_hash="x", host="127.0.0.1",
                                 **parse_transfer_options("mooncake", ["protocol=rdma",
                                                                       "device_name=epd_no_such_hca"]))
        try:
            await backend.start()
        finally:
            await backend.close()

    with pytest.raises(TransferError, match=r"RDMA device\(s\) \['epd_no_such_hca'\] not found"):
        asyncio.run(start())
