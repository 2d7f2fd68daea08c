"""``--transfer-option KEY=VALUE`` on `epd worker` and `epd up`: parsed, validated with a
usage error before anything starts, and really used by the worker's backend."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from deploy.cli import build_parser, main
from deploy.cluster_cli import worker_config
from kv_transfer import backend_availability
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from worker.config import free_port

REPO = Path(__file__).resolve().parents[2]


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_worker_config_gets_typed_options() -> None:
    args = build_parser().parse_args(["worker", "prefill", "--transfer", "mooncake",
                                      "--transfer-option", "protocol=rdma",
                                      "--transfer-option", "device_name=mlx5_0",
                                      "--transfer-option", "slice_bytes=8388608"])
    config = worker_config(args)
    assert config.transfer_options == {"protocol": "rdma", "device_name": "mlx5_0", "slice_bytes": 8 << 20}
    plain = worker_config(build_parser().parse_args(["worker", "decode"]))
    assert plain.transfer == "tcp" and plain.transfer_options == {}


@pytest.mark.parametrize("argv, message", [
    (["worker", "prefill", "--transfer", "mooncake", "--transfer-option", "protocol=udp"],
     "epd worker: error: invalid options for transfer backend 'mooncake': mooncake protocol must be "
     "'tcp' or 'rdma', got 'udp'"),
    (["worker", "decode", "--transfer", "nixl", "--transfer-option", "num_worker=2"],
     "epd worker: error: unknown option 'num_worker' for transfer backend 'nixl'; valid keys: "
     "cancel_grace_s, drain_timeout_s, handshake_timeout, max_inflight_slices, notify_poll_s, "
     "num_workers, port, progress_thread, progress_wake_us, slice_bytes, ucx_devices, xfer_poll_s"),
    (["worker", "decode", "--transfer-option", "chunk_bytes=big"],
     "epd worker: error: transfer option chunk_bytes='big': not a valid int"),
    (["worker", "decode", "--transfer-option", "host=0.0.0.0"],
     "epd worker: error: transfer option 'host' is set by the worker itself (use --host)"),
    (["worker", "decode", "--transfer", "none", "--transfer-option", "port=5"],
     "epd worker: error: --transfer-option needs a transfer backend"),
    (["worker", "prefill", "--transfer", "rdma"],
     "epd worker: error: unknown transfer backend 'rdma'; available: ['cuda_ipc', 'mooncake', 'nixl', 'tcp']"),
    (["up", "--transfer", "mooncake", "--transfer-option", "protocol=rdma"],
     "epd up: error: invalid options for transfer backend 'mooncake': mooncake protocol 'rdma' needs "
     "device_name"),
    (["up", "--prefill", "1", "--decode", "1", "--transfer-option", "port=9000"],
     "epd up: error: --transfer-option port=... would give every worker the same transfer port"),
])
def test_bad_options_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(argv, capsys)
    assert f"usage: epd {argv[0]}" in err
    assert message in err


def _spawn_worker(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MC_LOG_LEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "deploy.cli", "worker", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


async def _status(address: str, deadline_s: float) -> pb.WorkerStatus:
    """The worker's Status once it answers (bounded)."""
    end = time.monotonic() + deadline_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DecodeWorkerStub(channel)
        while True:
            try:
                return await stub.Status(pb.StatusRequest(), timeout=2.0)
            except grpc.aio.AioRpcError:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.2)


@pytest.mark.timeout(180)
# tcp and one one-sided backend (mooncake's and nixl's control channel is the same code;
# mooncake's own options are checked reaching its engine below).
@pytest.mark.parametrize("transfer", ["tcp", "nixl"])
def test_worker_backend_listens_where_the_option_says(tmp_path: Path, transfer: str) -> None:
    if backend_availability()[transfer] is not None:
        pytest.skip(f"transfer backend {transfer} is not installed here")
    grpc_port, transfer_port = free_port(), free_port()
    proc = _spawn_worker(["decode", "--port", str(grpc_port), "--transfer", transfer,
                          "--transfer-option", f"port={transfer_port}"], tmp_path / "worker.log")
    try:
        status = asyncio.run(_status(f"127.0.0.1:{grpc_port}", 120))
        assert status.transfer == transfer
        assert status.transfer_address == f"127.0.0.1:{transfer_port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0, (tmp_path / "worker.log").read_text()[-2000:]


@pytest.mark.timeout(180)
@pytest.mark.skipif(backend_availability()["mooncake"] is not None, reason="mooncake not installed")
def test_mooncake_worker_passes_protocol_and_device_to_the_engine(tmp_path: Path) -> None:
    # No RDMA device of that name exists: Mooncake is asked for it (and the worker
    # says so) instead of the option being dropped or silently served over TCP.
    proc = _spawn_worker(["prefill", "--transfer", "mooncake", "--transfer-option", "protocol=rdma",
                          "--transfer-option", "device_name=epd_no_such_hca"], tmp_path / "worker.log")
    assert proc.wait(timeout=150) == 1
    log = (tmp_path / "worker.log").read_text()
    assert ("epd worker: error: transfer backend 'mooncake': mooncake protocol 'rdma': "
            "RDMA device(s) ['epd_no_such_hca'] not found") in log
