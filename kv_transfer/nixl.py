"""The ``nixl`` backend: NIXL agents with the UCX backend, one-sided WRITEs.

Each endpoint owns one ``nixl_agent`` (no listener thread: agent metadata
travels in our control handshake instead of NIXL's own socket) with NIXL's
progress thread, made event-driven (see ``_make_agent``): over UCX's TCP
transport bytes move only while a UCX worker is progressed, and the thread
does that as soon as a socket is ready, as a blocking socket would.
Regions are registered once: DRAM for CPU tensors, VRAM for CUDA tensors. A
write is posted as NIXL WRITE transfers, one per slice; the last one carries
the notification as its NIXL notif message (``Notification.encode()``), which
NIXL delivers to the receiver after the data. The receiver polls
``get_new_notifs`` (only while it has admitted writes waiting) and finishes the
write through ``RoomTable`` after checking room and generation. Transfer state
is polled with ``check_xfer_state`` between ``asyncio.sleep``s, never blocking
the event loop; the few slices the one-sided layer keeps in flight carry the
data over the gaps between polls.

What peers learn in the handshake (``local_info``): the agent name, its NIXL
metadata (base64; loaded with ``add_remote_agent``) and each region's address,
device id and memory type. Senders tell receivers their agent name, so a notif
is only accepted from the agent that opened the write.

UCX picks transports itself: inside one host it prefers shared memory.
(``UCX_MODULES`` defaults to ``^efa`` here: see ``_skip_ucx_efa_module``;
``UCX_USE_MT_MUTEX`` to ``y``: see ``_sleeping_worker_lock``.) To force
the network path (what tests and benchmarks of the inter-node case want), set
``UCX_TLS=tcp`` and ``UCX_NET_DEVICES=lo`` (or the NIC) in the environment
before the agent is created; ``ucx_devices`` below is NIXL's own device filter.

Install: ``pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1`` (the cu12 wheel
also works on CPU-only machines for DRAM).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .base import (EndpointDescriptor, IncompatiblePeerError, Notification,
                   PeerDisconnectedError, TransferError, register_backend)
from .onesided import EngineBackend, OneSidedConfig
from .onesided_engine import CompletionPoller, CopyEngine, LocalRegion, Segment, region_info
from .onesided_wire import b64, unb64

log = logging.getLogger(__name__)
_INSTALL_HINT = "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1"


@dataclass(frozen=True)
class NixlConfig(OneSidedConfig):
    ucx_devices: str = ""  # NIXL UCX backend "ucx_devices" ("" = UCX's choice)
    num_workers: int = 1  # UCX workers of the agent's UCX backend
    # NIXL's progress thread sleeps in poll() on the UCX workers' event fd and
    # progresses them when a socket is ready; ``progress_wake_us`` bounds that
    # sleep (NIXL's source rounds it up to whole ms), a fallback NIXL keeps for
    # events poll() may miss. Off, UCX progresses only inside our polls (the sender's
    # check_xfer_state, the receiver's get_new_notifs), at most once per
    # asyncio sleep (>= 1 ms): over TCP that left the link idle most of the time.
    progress_thread: bool = True
    progress_wake_us: int = 1000
    xfer_poll_s: float = 0.001  # sleep between check_xfer_state polls

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.progress_wake_us <= 0:
            # 0 is what NIXL's Python API passes: poll() without a timeout
            # turns the progress thread into a busy loop that takes a core.
            raise ValueError(f"progress_wake_us must be positive, got "
                             f"{self.progress_wake_us}")


@dataclass(frozen=True)
class RemoteRegion:
    address: int
    device_id: int
    mem_type: str  # "DRAM" or "VRAM"


@dataclass(frozen=True)
class NixlTarget:
    agent_name: str
    regions: Mapping[str, RemoteRegion]


def _import_nixl() -> Any:
    try:
        from nixl import _api
    except ImportError as exc:
        raise TransferError(f"the nixl transfer backend needs NIXL ({_INSTALL_HINT}): "
                            f"{exc}") from exc
    _keep_stdout_clean()
    _skip_ucx_efa_module()
    _sleeping_worker_lock()
    return _api


def _skip_ucx_efa_module() -> None:
    """The UCX bundled with nixl-cu12 has an EFA module that links the system's
    ``libefa.so.1`` (package ibverbs-providers, recommended by libibverbs1).
    That pulls the system libibverbs and libnl next to NIXL's bundled copies,
    and the process then segfaults at exit in libnl's destructors. UCX reads
    ``UCX_MODULES`` when the first agent creates its UCX backend, so skip the
    EFA module unless the operator chose modules themselves (EFA users usually
    drive NIXL through its LIBFABRIC backend, not UCX)."""
    os.environ.setdefault("UCX_MODULES", "^efa")


def _sleeping_worker_lock() -> None:
    """With the progress thread, a UCX worker is shared by two threads: NIXL's
    (progressing on socket events) and ours (``check_xfer_state`` progresses
    it too, inside NIXL). UCX guards it with a spinlock unless
    ``UCX_USE_MT_MUTEX=y``; measured on a 2-core host, the progress thread then
    spent a third of the sender's CPU spinning while our thread was inside a
    long ``sendmsg``. A mutex sleeps instead. Read when an agent creates its
    UCX backend; an operator's own setting wins."""
    os.environ.setdefault("UCX_USE_MT_MUTEX", "y")


def _keep_stdout_clean() -> None:
    """NIXL's Python logger prints INFO lines to stdout; workers and test peers
    use stdout for their own output, so send NIXL's records to stderr at
    WARNING (NIXL_LOG_LEVEL, when set, still picks the level)."""
    nixl_log = logging.getLogger("nixl")
    for handler in nixl_log.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    if nixl_log.level < logging.WARNING and "NIXL_LOG_LEVEL" not in os.environ:
        nixl_log.setLevel(logging.WARNING)


def _make_agent(api: Any, name: str, config: NixlConfig) -> Any:
    """A ``nixl_agent`` without backends yet (``create_backend`` starts the
    progress thread). NIXL's Python API builds its core agent with the progress
    thread's poll timeout (``pthrDelay``) fixed at 0, a busy loop; so the
    wrapper is made without the thread and given a core agent built from the
    bindings' own config, with ``progress_wake_us``. The wrapper keeps no other
    state about its core agent before a backend exists."""
    conf = api.nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False,
                                 backends=[])
    agent = api.nixl_agent(name, conf)
    if config.progress_thread:
        if not hasattr(api, "nixlBind"):
            raise TransferError("nixl: this NIXL's Python API does not expose its "
                                "bindings (nixlBind), so its progress thread would "
                                "busy-poll a core; use progress_thread=False")
        core = api.nixlBind.nixlAgentConfig()
        core.useProgThread = True
        core.useListenThread = False
        core.syncMode = api.nixl_thread_sync_t.NIXL_THREAD_SYNC_NONE.value
        core.pthrDelay = config.progress_wake_us
        agent.agent = api.nixlBind.nixlAgent(name, core)
    return agent


def _mem_type(region: LocalRegion) -> tuple[str, int]:
    device = region.tensor.device
    if device.type == "cuda":
        return "VRAM", device.index or 0
    if device.type == "cpu":
        return "DRAM", 0
    raise ValueError(f"nixl backend: region {region.name!r} is on {device}")


class NixlEngine(CopyEngine):
    in_band_notifications = True

    def __init__(self, config: NixlConfig) -> None:
        self._api = _import_nixl()
        self._config = config
        self.agent_name = f"epd-{uuid.uuid4().hex[:16]}"
        self._agent: Any = None
        self._registered: dict[str, tuple[LocalRegion, Any]] = {}
        self._remote_refs: dict[str, int] = {}  # remote agent -> open targets
        self._poller = CompletionPoller(config.xfer_poll_s)

    async def start(self, hostname: str) -> None:
        del hostname  # UCX addresses travel inside the agent metadata
        api, cfg = self._api, self._config
        agent = await asyncio.to_thread(_make_agent, api, self.agent_name, cfg)
        params = {"num_workers": str(cfg.num_workers)}
        if cfg.ucx_devices:
            params["ucx_devices"] = cfg.ucx_devices
        try:
            await asyncio.to_thread(agent.create_backend, "UCX", params)
        except Exception as exc:  # nixl raises its own exception types
            raise TransferError(f"nixl: creating the UCX backend failed: {exc}") from exc
        self._agent = agent

    async def close(self) -> None:
        await self._poller.close()
        if self._agent is None:
            return
        for remote in list(self._remote_refs):
            self._call(self._agent.remove_remote_agent, remote)
        self._remote_refs.clear()
        for _, descs in self._registered.values():
            self._call(self._agent.deregister_memory, descs)
        self._registered.clear()

    def register(self, region: LocalRegion) -> None:
        mem, device_id = _mem_type(region)
        try:
            descs = self._agent.register_memory(
                [(region.address, region.nbytes, device_id, "")], mem)
        except Exception as exc:
            raise TransferError(f"nixl register_memory of region {region.name!r} "
                                f"({mem}) failed: {exc}") from exc
        self._registered[region.name] = (region, descs)

    def local_info(self, sender: Mapping[str, Any]) -> dict[str, Any]:
        regions = {}
        for name, (region, _) in self._registered.items():
            mem, device_id = _mem_type(region)
            regions[name] = {"address": region.address, "device_id": device_id,
                             "mem_type": mem}
        return {"agent": self.agent_name,
                "metadata": b64(self._agent.get_agent_metadata()), "regions": regions}

    def sender_info(self) -> dict[str, Any]:
        return {"id": self.agent_name}

    async def open_target(self, peer: EndpointDescriptor,
                          info: Mapping[str, Any]) -> NixlTarget:
        name = info.get("agent")
        if not isinstance(name, str) or not name:
            raise IncompatiblePeerError(f"peer {peer.address} sent no NIXL agent name")
        regions = {spec.name: _remote_region(peer, info, spec.name) for spec in peer.regions}
        if name not in self._remote_refs:
            try:
                loaded = self._agent.add_remote_agent(unb64(info.get("metadata")))
            except Exception as exc:
                raise IncompatiblePeerError(f"peer {peer.address}: NIXL could not load "
                                            f"its agent metadata: {exc}") from exc
            loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
            if loaded != name:
                self._call(self._agent.remove_remote_agent, loaded)
                raise IncompatiblePeerError(f"peer {peer.address}: metadata is for agent "
                                            f"{loaded!r}, not {name!r}")
        self._remote_refs[name] = self._remote_refs.get(name, 0) + 1
        return NixlTarget(name, regions)

    def close_target(self, target: object) -> None:
        assert isinstance(target, NixlTarget)
        left = self._remote_refs.get(target.agent_name, 0) - 1
        if left > 0:
            self._remote_refs[target.agent_name] = left
            return
        self._remote_refs.pop(target.agent_name, None)
        if self._agent is not None:
            self._call(self._agent.remove_remote_agent, target.agent_name)

    async def copy(self, target: object, local: LocalRegion, segments: Sequence[Segment],
                   notification: Notification | None) -> None:
        assert isinstance(target, NixlTarget)
        remote = target.regions[local.name]
        mem, device_id = _mem_type(local)
        src = np.array([(local.address + s.src_offset, s.nbytes, device_id)
                        for s in segments], dtype=np.uint64)
        dst = np.array([(remote.address + s.dst_offset, s.nbytes, remote.device_id)
                        for s in segments], dtype=np.uint64)
        message = notification.encode() if notification is not None else b""
        agent = self._agent
        try:
            handle = agent.initialize_xfer(
                "WRITE", agent.get_xfer_descs(src, mem),
                agent.get_xfer_descs(dst, remote.mem_type), target.agent_name, message)
        except Exception as exc:
            raise TransferError(f"nixl initialize_xfer to {target.agent_name} failed: "
                                f"{exc}") from exc
        try:
            state = self._state(agent.transfer, handle, message)
            if state == "PROC":
                await self._poller.track(partial(self._landed, agent, handle,
                                                 target.agent_name))
            elif state != "DONE":
                raise TransferError(f"nixl transfer to {target.agent_name} ended in "
                                    f"state {state}")
        finally:
            self._release(handle)

    def _landed(self, agent: Any, handle: Any, peer: str) -> bool:
        state = self._state(agent.check_xfer_state, handle)
        if state not in ("DONE", "PROC"):
            raise TransferError(f"nixl transfer to {peer} ended in state {state}")
        return state == "DONE"

    @staticmethod
    def _state(fn: Any, *args: Any) -> str:
        """``transfer``/``check_xfer_state`` with NIXL's exceptions mapped."""
        try:
            return str(fn(*args))
        except Exception as exc:
            if type(exc).__name__ == "nixlRemoteDisconnectError":
                raise PeerDisconnectedError(f"nixl peer disconnected: {exc}") from exc
            raise TransferError(f"nixl transfer failed: {exc}") from exc

    def _release(self, handle: Any) -> None:
        # Releasing an unfinished transfer asks NIXL to cancel it; if it cannot,
        # the handle is kept by NIXL and freed with the agent.
        self._call(handle.release)

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        try:
            notifs = self._agent.get_new_notifs()
        except Exception as exc:
            log.warning("nixl get_new_notifs failed: %s", exc)
            return []
        return [(str(agent), bytes(msg)) for agent, msgs in notifs.items()
                for msg in msgs if msg]

    @staticmethod
    def _call(fn: Any, *args: Any) -> None:
        """Best-effort cleanup call: log NIXL errors instead of raising them."""
        try:
            fn(*args)
        except Exception as exc:
            log.debug("nixl cleanup %s failed: %s", getattr(fn, "__name__", fn), exc)


def _remote_region(peer: EndpointDescriptor, info: Mapping[str, Any],
                   name: str) -> RemoteRegion:
    entry = region_info(info, peer, name)
    address, device_id, mem = (entry.get("address"), entry.get("device_id"),
                               entry.get("mem_type"))
    if (not isinstance(address, int) or address <= 0 or not isinstance(device_id, int)
            or mem not in ("DRAM", "VRAM")):
        raise IncompatiblePeerError(f"peer {peer.address}: bad NIXL info for region "
                                    f"{name!r}")
    return RemoteRegion(address, device_id, mem)


@register_backend("nixl")
class NixlBackend(EngineBackend):
    """NIXL (UCX) one-sided writes with in-band notifications."""

    config_class = NixlConfig

    def __init__(self, compat_hash: str, **config: Any) -> None:
        """``config``: the fields of ``NixlConfig`` (host, port, ucx_devices,
        num_workers, slice_bytes, ...)."""
        cfg = NixlConfig(**config)
        super().__init__(compat_hash, cfg, NixlEngine(cfg))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("nixl") is None:
            return f"package 'nixl' is not installed ({_INSTALL_HINT})"
        return None
