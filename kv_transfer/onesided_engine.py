"""The data-plane interface under the one-sided backends.

A ``CopyEngine`` moves bytes from a local registered region straight into a
peer's registered region (Mooncake Transfer Engine, NIXL, CUDA IPC); the
``OneSidedBackend`` around it does rooms, fencing, notifications and the control
channel. An engine never decides whether a write is allowed: by the time
``copy`` is called, the receiver has admitted the write and the sender has
checked its runs against the receiver's reservation.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import EndpointDescriptor, IncompatiblePeerError, Notification, PageRun


@dataclass(frozen=True)
class Segment:
    """``nbytes`` from byte ``src_offset`` of the local region to byte
    ``dst_offset`` of the peer's region of the same name."""

    src_offset: int
    dst_offset: int
    nbytes: int


@dataclass(frozen=True)
class LocalRegion:
    """A registered region as the one-sided backends keep it."""

    name: str
    tensor: torch.Tensor  # owns the memory for as long as the backend lives
    page_bytes: int

    @property
    def address(self) -> int:
        return self.tensor.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def plan_slices(runs: Sequence[PageRun], page_bytes: int,
                slice_bytes: int) -> list[list[Segment]]:
    """Cut page runs into slices of at most ``slice_bytes`` (runs split as needed).

    A slice is the unit the sender posts before it looks at the control channel
    again, so it bounds how many bytes can still land after a room is released.
    """
    slices: list[list[Segment]] = []
    current: list[Segment] = []
    size = 0
    for run in runs:
        src, dst = run.src_page * page_bytes, run.dst_page * page_bytes
        left = run.num_pages * page_bytes
        while left:
            take = min(left, slice_bytes - size)
            current.append(Segment(src, dst, take))
            src, dst, left, size = src + take, dst + take, left - take, size + take
            if size == slice_bytes:
                slices.append(current)
                current, size = [], 0
    if current:
        slices.append(current)
    return slices


Check = Callable[[], bool]  # True once done, False while running; raises on failure


class CompletionPoller:
    """Polls every in-flight transfer of one engine from a single task.

    A write keeps a few slices in flight, and each may be several engine
    transfers; polling them one coroutine each woke the event loop once per
    transfer per ``poll_s`` (asyncio sleeps >= ~1 ms anyway), which on a
    2-core host was CPU taken from the bytes. The task runs while anything is
    tracked. A cancelled waiter is dropped: its owner cleans up after it.
    """

    def __init__(self, poll_s: float) -> None:
        self._poll_s = poll_s
        self._tracked: dict[asyncio.Future[None], Check] = {}
        self._task: asyncio.Task[None] | None = None

    def track(self, check: Check) -> asyncio.Future[None]:
        """A future that resolves once ``check()`` says done (or fails with
        what it raised). The first check runs on the next poll."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tracked[done] = check
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return done

    async def _run(self) -> None:
        while self._tracked:
            await asyncio.sleep(self._poll_s)
            for done, check in list(self._tracked.items()):
                if done.cancelled():
                    del self._tracked[done]
                    continue
                try:
                    finished = check()
                except Exception as exc:  # the waiter reports it
                    del self._tracked[done]
                    done.set_exception(exc)
                    continue
                if finished:
                    del self._tracked[done]
                    done.set_result(None)

    async def close(self) -> None:
        for done in self._tracked:
            done.cancel()
        self._tracked.clear()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def region_info(info: Mapping[str, Any], peer: EndpointDescriptor,
                name: str) -> Mapping[str, Any]:
    """The entry of ``info["regions"]`` for ``name``, checked to exist."""
    regions = info.get("regions")
    if not isinstance(regions, dict) or not isinstance(regions.get(name), dict):
        raise IncompatiblePeerError(f"peer {peer.address} published no engine "
                                    f"information for region {name!r}")
    entry: Mapping[str, Any] = regions[name]
    return entry


class CopyEngine(abc.ABC):
    """One transfer engine instance per backend endpoint."""

    # True: the final slice carries the notification through the engine itself
    # (NIXL notifs), and the receiver finishes the write when ``poll_notifications``
    # returns it. False: the sender sends DONE on the control channel once ``copy``
    # of the last slice has returned (it returns only once the bytes have landed).
    in_band_notifications: ClassVar[bool] = False

    @abc.abstractmethod
    async def start(self, hostname: str) -> None:
        """Bring the engine up; ``hostname`` is what peers use to reach it."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Unregister memory and drop the engine (in-flight copies may fail)."""

    @abc.abstractmethod
    def register(self, region: LocalRegion) -> None:
        """Register the region's memory with the engine (once per region)."""

    @abc.abstractmethod
    def local_info(self, sender: Mapping[str, Any]) -> dict[str, Any]:
        """JSON-safe: what the sender that said ``sender`` (its ``sender_info``,
        untrusted) needs to write into our regions. Sent in the handshake reply,
        so it is always fresh, even after a restart."""

    def sender_info(self) -> dict[str, Any]:
        """JSON-safe: what a receiver needs to know about a sender (handshake).
        Key ``"id"`` names the sender's engine (e.g. its NIXL agent)."""
        return {}

    @abc.abstractmethod
    async def open_target(self, peer: EndpointDescriptor,
                          info: Mapping[str, Any]) -> object:
        """Prepare writes to a peer from its ``local_info``; returns an opaque
        target. Raises IncompatiblePeerError for unusable info."""

    @abc.abstractmethod
    def close_target(self, target: object) -> None:
        """Forget a target; called once no write uses it any more."""

    @abc.abstractmethod
    async def copy(self, target: object, local: LocalRegion, segments: Sequence[Segment],
                   notification: Notification | None) -> None:
        """Copy one slice and return once its bytes have landed in the peer's
        memory. ``notification`` (in-band engines only) rides with the slice.
        Raises TransferError when the engine fails. Cancelling must not leave
        the event loop blocked (engines with blocking calls use threads)."""

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """In-band engines: (sender id, notification bytes) received so far.
        Must not block."""
        return []
