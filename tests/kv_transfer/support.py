"""Conformance-suite plumbing: how to make an endpoint of each backend, KV-shaped
test tensors, and a receiver that runs in a separate process.

A new backend plugs into the suite by adding a ``BackendFactory`` to
``FACTORIES``; every conformance test then runs against it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from kv_transfer import (EndpointDescriptor, PeerHandle, TransferBackend,
                         backend_availability, compat_hash, create_backend)

REPO_ROOT = Path(__file__).resolve().parents[2]
# A small KV page: [layers=2, K/V, page_size=4, kv_heads=2, head_dim=32] in bf16.
PAGE_SHAPE = (2, 2, 4, 2, 32)
PAGE_BYTES = math.prod(PAGE_SHAPE) * 2
NUM_PAGES = 256  # pages of the endpoints of the `pair` fixture
COMPAT = compat_hash(model="conformance", dtype="bfloat16", num_layers=2,
                     num_kv_heads=2, head_dim=32, page_size=4, tp="1")


def _same_address(descriptor: EndpointDescriptor) -> dict[str, Any]:
    return {"port": int(descriptor.address.rpartition(":")[2])}


@dataclass(frozen=True)
class BackendFactory:
    """How the suite builds endpoints of one backend."""

    name: str
    device: str = "cpu"  # where region tensors live
    config: Mapping[str, Any] = field(default_factory=dict)
    # Extra config that makes a restarted endpoint listen where the old one did.
    same_address: Callable[[EndpointDescriptor], dict[str, Any]] | None = None

    def create(self, compat: str = COMPAT, **overrides: Any) -> TransferBackend:
        return create_backend(self.name, compat_hash=compat,
                              **{**self.config, **overrides})


# One-sided backends (kv_transfer/onesided.py) move 4 MiB slices, so that the
# abort test catches a write midway. The environment makes their libraries take
# the network path on loopback: NIXL's UCX over TCP on "lo" (inside one host it
# would pick shared memory), Mooncake's TCP transport bound to 127.0.0.1. Set
# before any engine exists; peer processes inherit it.
os.environ.setdefault("UCX_TLS", "tcp")
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
_ONE_SIDED = {"host": "127.0.0.1", "port": 0, "slice_bytes": 4 << 20}

FACTORIES: dict[str, BackendFactory] = {
    "tcp": BackendFactory("tcp", config={"host": "127.0.0.1", "port": 0},
                          same_address=_same_address),
    "mooncake": BackendFactory("mooncake", config={**_ONE_SIDED, "protocol": "tcp"},
                               same_address=_same_address),
    "nixl": BackendFactory("nixl", config=_ONE_SIDED, same_address=_same_address),
    # GPU copies are fast: 1 MiB slices so that a release still catches a write midway.
    "cuda_ipc": BackendFactory("cuda_ipc", device="cuda",
                               config={**_ONE_SIDED, "slice_bytes": 1 << 20},
                               same_address=_same_address),
}


def suite_params() -> list[Any]:
    """Params of the ``factory`` fixture: every registered backend; those whose
    regions live on a GPU are marked ``gpu``, those that cannot run here
    (missing package, no CUDA) are skipped with the reason."""
    params = []
    for name, reason in backend_availability().items():
        known = FACTORIES.get(name)
        marks = [pytest.mark.gpu] if known is not None and known.device == "cuda" else []
        if reason is not None:
            marks.append(pytest.mark.skip(reason=f"{name}: {reason}"))
        params.append(pytest.param(name, marks=marks))
    return params


def factory_for(name: str) -> BackendFactory:
    if name not in FACTORIES:
        pytest.fail(f"backend {name!r} is registered but has no BackendFactory in "
                    "tests/kv_transfer/support.py")
    return FACTORIES[name]


def random_bytes(nbytes: int, seed: int) -> torch.Tensor:
    """``nbytes`` random bytes (generated as int64 words: 8x fewer draws)."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.empty(-(-nbytes // 8), dtype=torch.int64).random_(generator=gen)
    return words.view(torch.uint8)[:nbytes]


def random_kv(num_pages: int, seed: int, device: str = "cpu") -> torch.Tensor:
    raw = random_bytes(num_pages * PAGE_BYTES, seed)
    return raw.view(torch.bfloat16).reshape(num_pages, *PAGE_SHAPE).to(device)


@dataclass(frozen=True)
class Pair:
    """Two started endpoints in this process, region "kv" on each, connected."""

    sender: TransferBackend
    receiver: TransferBackend
    src: torch.Tensor  # sender's region (random bytes)
    dst: torch.Tensor  # receiver's region (different random bytes)
    peer: PeerHandle  # sender -> receiver


async def open_endpoint(factory: BackendFactory, kv: torch.Tensor,
                        **overrides: Any) -> TransferBackend:
    backend = factory.create(**overrides)
    await backend.start()
    await backend.register_region("kv", kv)
    return backend


def page_bytes_of(kv: torch.Tensor, pages: list[int] | range) -> bytes:
    """Raw bytes of ``pages`` (bf16 may hold NaN patterns: compare bytes)."""
    return kv[list(pages)].cpu().view(torch.uint8).numpy().tobytes()


# ----------------------------------------------------------- separate process


@dataclass
class PeerProcess:
    """A receiver endpoint in its own process (``peer_main``): every page of its
    region is reserved for room ``PEER_ROOM`` generation 1; after each
    notification it prints the sha256 of the pages named in the payload."""

    proc: asyncio.subprocess.Process
    descriptor: EndpointDescriptor

    async def next_report(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("peer process exited")
        return json.loads(line)

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.returncode is None:
            os.kill(self.proc.pid, sig)

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        await self.proc.wait()


PEER_ROOM = "peer-room"


async def spawn_peer(factory: BackendFactory, num_pages: int,
                     extra_config: Mapping[str, Any] | None = None) -> PeerProcess:
    args = [sys.executable, "-m", "tests.kv_transfer.peer_main", factory.name,
            str(num_pages), json.dumps(dict(extra_config or {}))]
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=REPO_ROOT, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if not line:
        raise RuntimeError("peer process failed to start")
    return PeerProcess(proc, EndpointDescriptor.from_dict(json.loads(line)))
