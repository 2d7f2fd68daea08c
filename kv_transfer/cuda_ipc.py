"""The ``cuda_ipc`` backend: GPU-to-GPU copies between processes of one host.

The receiver exports each registered region with CUDA IPC through torch
(``UntypedStorage._share_cuda_()``: the allocation's IPC memory handle, the
storage's offset in it, torch's IPC reference-counter slot and producer event);
the sender opens it once per connection (``UntypedStorage._new_shared_cuda``,
as ``torch.multiprocessing`` does) and copies page runs into it with
``Tensor.copy_`` on a side stream that first waits for the sender's current
stream (so the KV the model just wrote is complete). Completion is a CUDA event
polled between ``asyncio.sleep``s. NVLink/PCIe peer copies are torch's business.

Handles travel in the handshake reply as explicit JSON fields (bytes in
base64), never pickled, and are exported per connection, as torch does per
send. GPUs are matched by UUID, not index, so processes with different
``CUDA_VISIBLE_DEVICES`` still agree on which GPU holds a region; a peer on
another host is refused (boot id differs).

Peers in the same process (tests) cannot open their own IPC handles; they find
each other's region through a process-local table keyed by a random token.

Rooms, fencing and notifications are ``OneSidedBackend``'s. The module imports
on machines without CUDA; ``start()`` raises a clear error there.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .base import (EndpointDescriptor, IncompatiblePeerError, Notification,
                   TransferError, register_backend)
from .onesided import EngineBackend, OneSidedConfig
from .onesided_engine import CopyEngine, LocalRegion, Segment, region_info
from .onesided_wire import b64, unb64

# Same-process peers only: token -> the receiver's region tensor. Weak, so a
# closed backend's memory is never kept alive or reachable through it.
_IN_PROCESS: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class CudaIpcConfig(OneSidedConfig):
    # GPU copies are fast: slices only bound aborts. 256 MiB measured 136 GB/s for a
    # 256 MiB write on an H200, 64 MiB 76 GB/s (each slice costs a completion poll).
    slice_bytes: int = 256 << 20
    max_inflight_slices: int = 1  # not measured on GPUs with more in flight yet
    copy_poll_s: float = 0.0005  # longest sleep between CUDA event polls


def _host_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return os.uname().nodename


def _device_uuid(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    return str(getattr(props, "uuid", index))


def _export(tensor: torch.Tensor) -> dict[str, Any]:
    """The IPC handle of the tensor's storage, as explicit JSON-safe fields."""
    (device, handle, size, offset, counter, counter_offset, event,
     event_sync) = tensor.untyped_storage()._share_cuda_()
    return {"device_uuid": _device_uuid(device), "handle": b64(handle),
            "storage_bytes": int(size), "storage_offset": int(offset),
            "ref_counter": b64(counter), "ref_counter_offset": int(counter_offset),
            "event": b64(event), "event_sync": bool(event_sync),
            "byte_offset": tensor.storage_offset() * tensor.element_size(),
            "nbytes": tensor.numel() * tensor.element_size()}


def _int(entry: Mapping[str, Any], key: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise IncompatiblePeerError(f"cuda_ipc handle field {key!r} is not a "
                                    "non-negative integer")
    return value


def _open(entry: Mapping[str, Any], devices: Mapping[str, int]) -> torch.Tensor:
    """Open an exported region: a flat uint8 tensor over the peer's memory."""
    device = devices.get(str(entry.get("device_uuid")))
    if device is None:
        raise IncompatiblePeerError(f"cuda_ipc: the peer's GPU {entry.get('device_uuid')} "
                                    "is not visible in this process")
    event_sync = entry.get("event_sync")
    if not isinstance(event_sync, bool):
        raise IncompatiblePeerError("cuda_ipc handle field 'event_sync' is not a bool")
    storage = torch.UntypedStorage._new_shared_cuda(
        device, unb64(entry.get("handle")), _int(entry, "storage_bytes"),
        _int(entry, "storage_offset"), unb64(entry.get("ref_counter")),
        _int(entry, "ref_counter_offset"), unb64(entry.get("event")), event_sync)
    byte_offset, nbytes = _int(entry, "byte_offset"), _int(entry, "nbytes")
    if byte_offset + nbytes > storage.nbytes():
        raise IncompatiblePeerError("cuda_ipc: region exceeds the shared storage")
    view = torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}")
    return view.set_(storage, byte_offset, (nbytes,), (1,))


@dataclass(frozen=True)
class CudaIpcTarget:
    regions: Mapping[str, torch.Tensor]  # flat uint8 views of the peer's regions


class CudaIpcEngine(CopyEngine):
    def __init__(self, config: CudaIpcConfig) -> None:
        self._config = config
        self._regions: dict[str, tuple[LocalRegion, torch.Tensor, str]] = {}
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._process = f"{_host_id()}/{os.getpid()}"

    async def start(self, hostname: str) -> None:
        del hostname
        if not torch.cuda.is_available():
            raise TransferError("the cuda_ipc transfer backend needs CUDA GPUs: "
                                "torch.cuda.is_available() is False on this machine")

    async def close(self) -> None:
        for _, _, token in self._regions.values():
            _IN_PROCESS.pop(token, None)
        self._regions.clear()

    def register(self, region: LocalRegion) -> None:
        if region.tensor.device.type != "cuda":
            raise ValueError(f"cuda_ipc backend needs CUDA tensors, region "
                             f"{region.name!r} is on {region.tensor.device}")
        flat = region.tensor.detach().reshape(-1).view(torch.uint8)
        token = secrets.token_hex(16)
        _IN_PROCESS[token] = flat
        self._regions[region.name] = (region, flat, token)

    def sender_info(self) -> dict[str, Any]:
        return {"id": self._process}

    def local_info(self, sender: Mapping[str, Any]) -> dict[str, Any]:
        same_process = sender.get("id") == self._process
        regions = {}
        for name, (region, _, token) in self._regions.items():
            entry = {} if same_process else _export(region.tensor)
            regions[name] = {**entry, "token": token}
        return {"host": _host_id(), "process": self._process, "regions": regions}

    async def open_target(self, peer: EndpointDescriptor,
                          info: Mapping[str, Any]) -> CudaIpcTarget:
        if info.get("host") != _host_id():
            raise IncompatiblePeerError(f"cuda_ipc: peer {peer.address} runs on another "
                                        "host (CUDA IPC works within one host only)")
        same_process = info.get("process") == self._process
        devices = {_device_uuid(i): i for i in range(torch.cuda.device_count())}
        regions = {}
        for spec in peer.regions:
            entry = region_info(info, peer, spec.name)
            local = _IN_PROCESS.get(str(entry.get("token"))) if same_process else None
            if same_process and local is None:
                raise IncompatiblePeerError(f"cuda_ipc: region {spec.name!r} of "
                                            f"{peer.address} is gone")
            try:
                view = local if local is not None else _open(entry, devices)
            except (RuntimeError, ValueError) as exc:  # torch/CUDA refused the handle
                raise IncompatiblePeerError(f"cuda_ipc: cannot open region "
                                            f"{spec.name!r} of {peer.address}: {exc}") from exc
            if view.numel() != spec.nbytes:
                raise IncompatiblePeerError(f"cuda_ipc: region {spec.name!r} of "
                                            f"{peer.address} has {view.numel()} B, its "
                                            f"descriptor says {spec.nbytes} B")
            regions[spec.name] = view
        return CudaIpcTarget(regions)

    def close_target(self, target: object) -> None:
        pass  # dropping the views closes the IPC mappings (torch refcounts them)

    async def copy(self, target: object, local: LocalRegion, segments: Sequence[Segment],
                   notification: Notification | None) -> None:
        assert isinstance(target, CudaIpcTarget)
        _, src, _ = self._regions[local.name]
        dst = target.regions[local.name]
        device = src.device
        stream = self._stream(device)
        with torch.cuda.device(device):
            # Order after whatever the caller's stream last wrote into the pages.
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for seg in segments:
                    dst[seg.dst_offset:seg.dst_offset + seg.nbytes].copy_(
                        src[seg.src_offset:seg.src_offset + seg.nbytes], non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
        delay = 2e-5
        while not done.query():
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._config.copy_poll_s)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(device=index)
        return self._streams[index]


@register_backend("cuda_ipc")
class CudaIpcBackend(EngineBackend):
    """CUDA IPC copies between GPUs of one host."""

    config_class = CudaIpcConfig

    def __init__(self, compat_hash: str, **config: Any) -> None:
        """``config``: the fields of ``CudaIpcConfig`` (host, port, slice_bytes, ...)."""
        cfg = CudaIpcConfig(**config)
        super().__init__(compat_hash, cfg, CudaIpcEngine(cfg))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.cuda.is_available():
            return "CUDA is not available (torch.cuda.is_available() is False)"
        return None
