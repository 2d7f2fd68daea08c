"""The ``mooncake`` backend: Mooncake Transfer Engine writes (TCP or RDMA).

Each endpoint runs one ``mooncake.engine.TransferEngine`` in P2PHANDSHAKE
metadata mode (no etcd/metadata server: engines exchange segment descriptors
directly over their RPC port), registers each region once
(``register_memory``), and writes each coalesced page run of a slice as one
``transfer_submit_write``, whose state is then polled with the non-blocking
``transfer_check_status`` between ``asyncio.sleep``s. (Not
``batch_transfer_sync_write``: it spins on the batch status without sleeping,
which costs a whole core per waiting call; on a 2-core host that core was taken
from the sender's and receiver's own transport threads.) Submitting runs in a
one-thread pool, because without Mooncake's connection pool it connects to the
peer inside the call. Rooms, fencing and notifications are
``OneSidedBackend``'s: the engine is one-sided, the receiver learns of a write
over the control channel.

Install: ``pip install mooncake-transfer-engine-non-cuda`` (CPU machines, TCP
and RDMA over host memory) or ``mooncake-transfer-engine`` (CUDA build, same
module; also registers GPU memory). Never both in one environment. RDMA needs
``libibverbs1`` (the wheel links it even for TCP).

What peers learn in the handshake (``local_info``): the Mooncake session id
``"host:rpc_port"`` and the base address of every registered region.

Environment knobs of the library worth knowing: ``MC_TCP_BIND_ADDRESS`` (the
TCP transport listens on all interfaces unless set), ``MC_LOG_LEVEL``. A
write abandoned on timeout leaves its transfers to the library (their batch
ids are not freed while they might still move bytes).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from .base import (EndpointDescriptor, IncompatiblePeerError, Notification,
                   TransferError, register_backend)
from .onesided import EngineBackend, OneSidedConfig
from .onesided_engine import CompletionPoller, CopyEngine, LocalRegion, Segment, region_info

_INSTALL_HINT = ("pip install mooncake-transfer-engine-non-cuda (CPU) or "
                 "mooncake-transfer-engine (CUDA)")


@dataclass(frozen=True)
class MooncakeConfig(OneSidedConfig):
    protocol: str = "tcp"  # "tcp" or "rdma"
    device_name: str = ""  # RDMA device filter, e.g. "mlx5_0" or "mlx5_0,mlx5_1"
    status_poll_s: float = 0.001  # sleep between transfer status polls

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.protocol not in ("tcp", "rdma"):
            raise ValueError(f"mooncake protocol must be 'tcp' or 'rdma', "
                             f"got {self.protocol!r}")
        if self.protocol == "rdma" and not self.device_names:
            raise ValueError("mooncake protocol 'rdma' needs device_name "
                             "(e.g. 'mlx5_0')")
        if self.protocol == "tcp" and self.device_name:
            raise ValueError(f"mooncake device_name {self.device_name!r} names an RDMA "
                             "device, but protocol is 'tcp' (set protocol=rdma)")
        if self.max_inflight_slices < 1:
            raise ValueError(f"max_inflight_slices must be >= 1, got "
                             f"{self.max_inflight_slices}")

    @property
    def device_names(self) -> list[str]:
        return [name.strip() for name in self.device_name.split(",") if name.strip()]


@dataclass(frozen=True)
class MooncakeTarget:
    session_id: str  # "host:rpc_port" of the peer's engine
    region_addresses: Mapping[str, int]  # region name -> base address there


class MooncakeEngine(CopyEngine):
    """One ``TransferEngine`` and the thread pool its blocking calls run in."""

    def __init__(self, config: MooncakeConfig) -> None:
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:
            raise TransferError(f"the mooncake transfer backend needs the Mooncake "
                                f"Transfer Engine ({_INSTALL_HINT}): {exc}") from exc
        self._config = config
        self._engine: Any = TransferEngine()
        self._session_id = ""
        self._registered: dict[str, LocalRegion] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mooncake-submit")
        self._poller = CompletionPoller(config.status_poll_s)

    async def start(self, hostname: str) -> None:
        cfg = self._config
        rc = await asyncio.to_thread(self._engine.initialize, hostname, "P2PHANDSHAKE",
                                     cfg.protocol, cfg.device_name)
        if rc != 0:
            raise TransferError(f"mooncake TransferEngine.initialize({hostname!r}, "
                                f"P2PHANDSHAKE, {cfg.protocol!r}, {cfg.device_name!r}) "
                                f"failed with {rc}")
        if cfg.protocol == "rdma":
            self._check_rdma_devices()
        self._session_id = f"{hostname}:{self._engine.get_rpc_port()}"

    def _check_rdma_devices(self) -> None:
        """Mooncake initializes "rdma" without complaint when the named devices do
        not exist and then moves every byte over its TCP transport instead; an
        operator who asked for RDMA gets an error here rather than silent TCP."""
        found = _topology_devices(self._engine.get_local_topology())
        missing = [name for name in self._config.device_names if name not in found]
        if missing:
            raise TransferError(f"mooncake protocol 'rdma': RDMA device(s) {missing} not "
                                f"found (Mooncake sees {sorted(found) or 'none'}); refusing "
                                "to fall back to TCP silently")

    async def close(self) -> None:
        # A submit still in its thread holds its own reference to the engine.
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self._poller.close()
        if self._engine is None:
            return
        for region in self._registered.values():
            self._engine.unregister_memory(region.address)  # refuse late writes
        self._registered.clear()
        self._engine = None  # stops its RPC and transport threads once unreferenced

    def register(self, region: LocalRegion) -> None:
        rc = self._engine.register_memory(region.address, region.nbytes)
        if rc != 0:
            raise TransferError(f"mooncake register_memory of region {region.name!r} "
                                f"({region.nbytes} B) failed with {rc}")
        self._registered[region.name] = region

    def local_info(self, sender: Mapping[str, Any]) -> dict[str, Any]:
        return {"session_id": self._session_id,
                "regions": {name: {"address": r.address}
                            for name, r in self._registered.items()}}

    async def open_target(self, peer: EndpointDescriptor,
                          info: Mapping[str, Any]) -> MooncakeTarget:
        session = info.get("session_id")
        if not isinstance(session, str) or ":" not in session:
            raise IncompatiblePeerError(f"peer {peer.address} sent no mooncake session id")
        addresses = {}
        for spec in peer.regions:
            address = region_info(info, peer, spec.name).get("address")
            if not isinstance(address, int) or address <= 0:
                raise IncompatiblePeerError(f"peer {peer.address}: bad address for "
                                            f"region {spec.name!r}")
            addresses[spec.name] = address
        return MooncakeTarget(session, addresses)

    def close_target(self, target: object) -> None:
        pass  # the engine caches the peer's segment by session id itself

    async def copy(self, target: object, local: LocalRegion, segments: Sequence[Segment],
                   notification: Notification | None) -> None:
        assert isinstance(target, MooncakeTarget)
        engine = self._engine
        if engine is None:
            raise TransferError("mooncake engine is closed")
        dst_base = target.region_addresses[local.name]
        src = [local.address + s.src_offset for s in segments]
        dst = [dst_base + s.dst_offset for s in segments]
        lengths = [s.nbytes for s in segments]
        loop = asyncio.get_running_loop()
        # The call's arguments keep the engine and the source tensor alive for as
        # long as the thread runs, even if this coroutine is cancelled (timeout).
        batches = await loop.run_in_executor(self._pool, _submit, engine, local,
                                             target.session_id, src, dst, lengths)
        # Wait for every transfer that was submitted, so that no byte of the
        # slice moves any more once this returns, even when one failed.
        waits = [self._poller.track(partial(_landed, engine, b)) for b in batches if b]
        results = await asyncio.gather(*waits, return_exceptions=True)
        failed = batches.count(0) + sum(1 for r in results if r is not None)
        if failed:
            raise TransferError(f"mooncake write to {target.session_id}: {failed} of "
                                f"{len(segments)} transfers failed or were refused")


def _topology_devices(topology_json: str) -> set[str]:
    """Device names in Mooncake's topology JSON: ``{"cpu:0": [[preferred HCAs],
    [other HCAs]], "cuda:0": ...}``."""
    try:
        topology = json.loads(topology_json)
    except (TypeError, ValueError) as exc:
        raise TransferError(f"mooncake returned an unreadable topology: {exc}") from None
    if not isinstance(topology, dict):
        return set()
    tiers = [tier for entry in topology.values() if isinstance(entry, list)
             for tier in entry if isinstance(tier, list)]
    return {name for tier in tiers for name in tier if isinstance(name, str)}


def _submit(engine: Any, local: LocalRegion, session_id: str, src: list[int],
            dst: list[int], lengths: list[int]) -> list[int]:
    """One transfer per segment; batch id 0 is Mooncake's "refused"."""
    del local  # only held so that the source memory outlives the call
    return [int(engine.transfer_submit_write(session_id, s, d, n))
            for s, d, n in zip(src, dst, lengths)]


def _landed(engine: Any, batch_id: int) -> bool:
    """``transfer_check_status``: 1 landed, 0 running, < 0 failed or timed out
    (the engine frees the batch id once it said 1 or -1)."""
    state = int(engine.transfer_check_status(batch_id))
    if state < 0:
        raise TransferError(f"mooncake transfer failed ({state})")
    return state == 1


@register_backend("mooncake")
class MooncakeBackend(EngineBackend):
    """Mooncake Transfer Engine (TCP or RDMA), P2P handshake, one-sided writes."""

    config_class = MooncakeConfig

    def __init__(self, compat_hash: str, **config: Any) -> None:
        """``config``: the fields of ``MooncakeConfig`` (host, port, protocol,
        device_name, slice_bytes, ...)."""
        cfg = MooncakeConfig(**config)
        super().__init__(compat_hash, cfg, MooncakeEngine(cfg))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("mooncake") is None:
            return f"package 'mooncake' is not installed ({_INSTALL_HINT})"
        return None
