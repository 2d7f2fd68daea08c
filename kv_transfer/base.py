"""The transfer-layer interface shared by every KV transfer backend.

Design rationale
----------------
* **Memory is registered once, as byte regions.** A worker's KV cache is one
  contiguous tensor laid out page-major ``[num_pages, num_layers, 2, page_size,
  kv_heads, head_dim]``, so page ``p`` is the byte range ``[p*page_bytes,
  (p+1)*page_bytes)`` and a run of adjacent pages is one contiguous range that
  covers every layer. Backends therefore move *page runs*, never per-layer
  pieces, and the interface speaks pages (``PageRun``) rather than raw offsets.
* **Descriptors are plain data.** ``EndpointDescriptor`` is what a worker
  publishes (inside gRPC/JSON messages, never pickled): backend name, address,
  region layout and a compatibility hash. ``connect`` refuses a peer whose hash
  differs, because mismatched models/dtypes/layouts would silently produce
  garbage KV.
* **Rooms fence writes.** The receiver reserves a *room* ``(room_id,
  generation)`` for the pages it allots to one request. A write names its room;
  bytes may land only in that room's pages, and only while that generation is
  live. Releasing or re-reserving a room makes every late or in-flight write for
  it fail with ``FencingError``, so a page handed to another request can never
  receive a stale write.
* **Who checks the fence depends on the backend.** Two-sided backends (``tcp``)
  check on the receiver before any byte touches memory. One-sided backends
  (Mooncake RDMA write, NIXL) cannot: there the receiver hands its
  ``RoomReservation`` to senders (``to_dict`` rides in the request's KV
  destination, or the sender fetches it over the backend's control channel), the
  sender calls ``RoomReservation.check_runs`` before posting writes, and the
  receiver checks the notification's ``(room_id, generation)`` against its live
  rooms before it uses the pages (``rooms.RoomTable.deliver``).
* **Notifications are ordered per room.** Each write carries one
  ``Notification`` (``seq`` = chunk index, ``final`` on the last chunk). The
  receiver hands them out in ``seq`` order, only after that chunk's bytes have
  landed; ``write`` returns only once the receiver has applied data and
  notification.
* **Every wait is bounded.** Every awaiting method takes a timeout; a dead peer
  surfaces as ``PeerDisconnectedError`` within seconds, a stuck one as
  ``TransferTimeoutError``.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import json
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

DEFAULT_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- errors


class TransferError(Exception):
    """Base class of every transfer-layer failure."""


class IncompatiblePeerError(TransferError):
    """The peer runs a different backend or has a different compatibility hash."""


class FencingError(TransferError):
    """A write targeted pages outside its room, or a stale/unknown/released room."""


class TransferTimeoutError(TransferError):
    """An operation did not finish within its timeout."""


class PeerDisconnectedError(TransferError):
    """The connection to the peer was lost (peer died, closed, or restarted)."""


# --------------------------------------------------------------------- plain data


def compat_hash(**fields: Any) -> str:
    """Stable sha256 over the sorted ``fields`` (model, dtype, layers, kv heads,
    head dim, page size, TP layout, ...). Values must be JSON-serializable."""
    canonical = json.dumps(sorted(fields.items()), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class RegionSpec:
    """Layout of one registered region as peers see it."""

    name: str
    nbytes: int
    page_bytes: int

    def __post_init__(self) -> None:
        if self.page_bytes <= 0 or self.nbytes % self.page_bytes:
            raise ValueError(f"region {self.name!r}: nbytes {self.nbytes} is not "
                             f"a multiple of page_bytes {self.page_bytes}")

    @property
    def num_pages(self) -> int:
        return self.nbytes // self.page_bytes


@dataclass(frozen=True)
class EndpointDescriptor:
    """What an endpoint publishes so that peers can connect and write to it."""

    backend: str
    address: str  # "host:port" or backend-specific
    regions: tuple[RegionSpec, ...]
    compat_hash: str

    def region(self, name: str) -> RegionSpec:
        for spec in self.regions:
            if spec.name == name:
                return spec
        raise KeyError(f"endpoint {self.address} has no region {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "address": self.address,
            "compat_hash": self.compat_hash,
            "regions": [
                {"name": r.name, "nbytes": r.nbytes, "page_bytes": r.page_bytes}
                for r in self.regions
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EndpointDescriptor:
        regions = tuple(
            RegionSpec(str(r["name"]), int(r["nbytes"]), int(r["page_bytes"]))
            for r in data["regions"]
        )
        return cls(str(data["backend"]), str(data["address"]), regions,
                   str(data["compat_hash"]))


@dataclass(frozen=True)
class PageRun:
    """``num_pages`` adjacent pages copied from ``src_page`` to ``dst_page``."""

    src_page: int
    dst_page: int
    num_pages: int

    def __post_init__(self) -> None:
        if self.src_page < 0 or self.dst_page < 0 or self.num_pages < 1:
            raise ValueError(f"invalid page run {self}")

    @property
    def dst_pages(self) -> range:
        return range(self.dst_page, self.dst_page + self.num_pages)


def coalesce(src_pages: Sequence[int], dst_pages: Sequence[int]) -> list[PageRun]:
    """Pair ``src_pages[i] -> dst_pages[i]`` and merge neighbours that are adjacent
    on BOTH sides into one run. Order is kept: only consecutive entries merge."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} "
                         "destination pages")
    runs: list[PageRun] = []
    for src, dst in zip(src_pages, dst_pages):
        last = runs[-1] if runs else None
        if (last is not None and src == last.src_page + last.num_pages
                and dst == last.dst_page + last.num_pages):
            runs[-1] = PageRun(last.src_page, last.dst_page, last.num_pages + 1)
        else:
            runs.append(PageRun(src, dst, 1))
    return runs


# Wire layout: version, flags (bit 0 = final), room_id length, seq, generation,
# payload length; then room_id (utf-8) and payload.
_NOTIFY_HEADER = struct.Struct("!BBHIQI")
_NOTIFY_VERSION = 1
_FLAG_FINAL = 1


@dataclass(frozen=True)
class Notification:
    """Delivered to the receiver once a write's bytes have landed.

    ``seq`` is the chunk index within the room (0, 1, 2, ...); ``final`` marks the
    last chunk. ``payload`` is opaque to the transfer layer (e.g. first token).
    """

    room_id: str
    generation: int
    seq: int
    payload: bytes = b""
    final: bool = False

    def encode(self) -> bytes:
        room = self.room_id.encode()
        flags = _FLAG_FINAL if self.final else 0
        try:
            header = _NOTIFY_HEADER.pack(_NOTIFY_VERSION, flags, len(room), self.seq,
                                         self.generation, len(self.payload))
        except struct.error as exc:
            raise ValueError(f"notification field out of range: {exc}") from exc
        return header + room + self.payload

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Notification:
        data = bytes(data)
        if len(data) < _NOTIFY_HEADER.size:
            raise ValueError("notification too short")
        version, flags, room_len, seq, generation, payload_len = (
            _NOTIFY_HEADER.unpack_from(data))
        if version != _NOTIFY_VERSION:
            raise ValueError(f"unknown notification version {version}")
        if len(data) != _NOTIFY_HEADER.size + room_len + payload_len:
            raise ValueError("notification length mismatch")
        start = _NOTIFY_HEADER.size
        room = data[start:start + room_len].decode()
        payload = data[start + room_len:]
        return cls(room, generation, seq, payload, bool(flags & _FLAG_FINAL))


@dataclass(frozen=True)
class RoomReservation:
    """The pages of one region that ``(room_id, generation)`` may write.

    Published by the receiver; one-sided backends pass it (``to_dict``) to the
    sender, which checks its runs with ``check_runs`` before writing."""

    room_id: str
    generation: int
    region: str
    page_ids: frozenset[int]

    def check_runs(self, region: str, runs: Iterable[PageRun]) -> None:
        """Raise ``FencingError`` unless every destination page is reserved."""
        if region != self.region:
            raise FencingError(f"room {self.room_id!r} reserved region "
                               f"{self.region!r}, write targets {region!r}")
        for run in runs:
            outside = [p for p in run.dst_pages if p not in self.page_ids]
            if outside:
                raise FencingError(f"room {self.room_id!r} gen {self.generation}: "
                                   f"pages {outside[:8]} are not reserved")

    def to_dict(self) -> dict[str, Any]:
        return {"room_id": self.room_id, "generation": self.generation,
                "region": self.region, "page_ids": sorted(self.page_ids)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoomReservation:
        return cls(str(data["room_id"]), int(data["generation"]), str(data["region"]),
                   frozenset(int(p) for p in data["page_ids"]))


@dataclass(frozen=True)
class TransferStats:
    """Snapshot of a backend's counters."""

    bytes_sent_total: int
    bytes_received_total: int
    transfer_seconds_total: float


WriteObserver = Callable[[float, int, bool], None]


@dataclass
class _Counters:
    # Mutated only by the owning backend, on its event loop.
    bytes_sent: int = 0
    bytes_received: int = 0
    transfer_seconds: float = 0.0


def region_spec_for(name: str, tensor: torch.Tensor,
                    page_bytes: int | None = None) -> RegionSpec:
    """Describe ``tensor`` as a region; pages are along dim 0 unless given."""
    if not tensor.is_contiguous():
        raise ValueError(f"region {name!r}: tensor must be contiguous")
    nbytes = tensor.numel() * tensor.element_size()
    if page_bytes is None:
        if tensor.dim() == 0 or tensor.shape[0] == 0:
            raise ValueError(f"region {name!r}: cannot infer pages from shape "
                             f"{tuple(tensor.shape)}; pass page_bytes")
        page_bytes = nbytes // tensor.shape[0]
    return RegionSpec(name, nbytes, page_bytes)


# ------------------------------------------------------------------- the interface


class PeerHandle(abc.ABC):
    """A connection to one remote endpoint, returned by ``connect``."""

    descriptor: EndpointDescriptor

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """False once the connection is lost or closed; reconnect with ``connect``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection; pending writes fail with PeerDisconnectedError."""


class TransferBackend(abc.ABC):
    """One endpoint of the transfer layer; every worker owns one.

    Sender side: ``connect`` then ``write``. Receiver side: ``reserve_room``,
    ``wait_notification``/``notifications``, ``release_room``. Both sides
    ``register_region`` and ``start`` first. All methods run on one event loop.
    """

    name: ClassVar[str] = ""
    # The frozen dataclass of the backend's ``**config`` (host, port, ...): command-line
    # options (``--transfer-option KEY=VALUE``) are checked against its fields.
    config_class: ClassVar[type]

    def __init__(self, compat_hash: str) -> None:
        self.compat_hash = compat_hash
        self._counters = _Counters()
        # Told of every finished write (seconds, bytes, ok), e.g. a worker's latency
        # histogram; called on the event loop, so it must be quick and never raise.
        self.write_observer: WriteObserver | None = None

    # -- lifecycle
    @abc.abstractmethod
    async def start(self) -> None:
        """Start serving (bind, listen); ``descriptor`` is valid afterwards."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop serving, drop connections, fail every pending wait."""

    async def __aenter__(self: _B) -> _B:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- memory
    @abc.abstractmethod
    async def register_region(self, name: str, tensor: torch.Tensor,
                              page_bytes: int | None = None) -> RegionSpec:
        """Register ``tensor`` (contiguous; any dtype, treated as bytes) as region
        ``name``. Pages run along dim 0 unless ``page_bytes`` is given. The memory
        is used in place: received bytes land in the tensor's storage."""

    @abc.abstractmethod
    def descriptor(self) -> EndpointDescriptor:
        """What peers need to connect: address, regions, compat hash."""

    # -- sender side
    @abc.abstractmethod
    async def connect(self, peer: EndpointDescriptor, *,
                      timeout: float = DEFAULT_TIMEOUT_S) -> PeerHandle:
        """Connect to ``peer``. Raises ``IncompatiblePeerError`` when backends or
        compat hashes differ (checked locally and in the handshake)."""

    @abc.abstractmethod
    async def write(self, peer: PeerHandle, room_id: str, generation: int,
                    region: str, runs: Sequence[PageRun],
                    notification: Notification, *,
                    timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Copy ``runs`` of local region ``region`` into the peer's region of the
        same name, then deliver ``notification`` (whose room/generation must
        match). Returns bytes sent once the receiver has applied data and
        notification. Raises FencingError, TransferTimeoutError,
        PeerDisconnectedError."""

    # -- receiver side
    @abc.abstractmethod
    def reserve_room(self, room_id: str, generation: int, region: str,
                     page_ids: Iterable[int]) -> RoomReservation:
        """Allow ``(room_id, generation)`` to write ``page_ids`` of ``region``.
        A page may belong to one live room only. Re-reserving a room id needs a
        higher generation and fences the old one. Synchronous so that a caller
        can reserve and hand out the destination without yielding; one-sided
        backends give senders the returned reservation (it travels with the
        request) or publish it on their control channel in the background."""

    @abc.abstractmethod
    def release_room(self, room_id: str) -> None:
        """Forget the room (idempotent); in-flight and later writes to it fail
        with FencingError, waiters wake with FencingError."""

    @abc.abstractmethod
    async def wait_notification(self, room_id: str, *,
                                timeout: float = DEFAULT_TIMEOUT_S) -> Notification:
        """Next notification of the room in ``seq`` order. Raises
        TransferTimeoutError, FencingError (room released/unknown) or
        PeerDisconnectedError (a writer of the unfinished room was lost)."""

    async def notifications(self, room_id: str, *,
                            timeout: float = DEFAULT_TIMEOUT_S
                            ) -> AsyncIterator[Notification]:
        """Yield the room's notifications in order up to and including the final
        one; ``timeout`` bounds each wait."""
        while True:
            note = await self.wait_notification(room_id, timeout=timeout)
            yield note
            if note.final:
                return

    async def wait_final(self, room_id: str, *,
                         timeout: float = DEFAULT_TIMEOUT_S) -> Notification:
        """Consume the room's notifications until the final one and return it;
        ``timeout`` bounds the whole wait. Once it returns, every chunk landed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = max(deadline - loop.time(), 0.0)
            note = await self.wait_notification(room_id, timeout=remaining)
            if note.final:
                return note

    # -- counters
    @property
    def bytes_sent_total(self) -> int:
        return self._counters.bytes_sent

    @property
    def bytes_received_total(self) -> int:
        return self._counters.bytes_received

    @property
    def transfer_seconds_total(self) -> float:
        return self._counters.transfer_seconds

    def stats(self) -> TransferStats:
        c = self._counters
        return TransferStats(c.bytes_sent, c.bytes_received, c.transfer_seconds)


_B = TypeVar("_B", bound=TransferBackend)


# ------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class _Registry:
    # Filled at import time by @register_backend only; read-only afterwards.
    classes: dict[str, type[TransferBackend]] = field(default_factory=dict)


_REGISTRY = _Registry()


def register_backend(name: str) -> Callable[[type[_B]], type[_B]]:
    """Class decorator: make the backend available to ``create_backend(name)``."""

    def decorate(cls: type[_B]) -> type[_B]:
        if name in _REGISTRY.classes:
            raise ValueError(f"transfer backend {name!r} registered twice")
        cls.name = name
        _REGISTRY.classes[name] = cls
        return cls

    return decorate


def available_backends() -> list[str]:
    """Names of the registered backends, sorted."""
    return sorted(_REGISTRY.classes)


def backend_class(name: str) -> type[TransferBackend]:
    """The class registered as ``name``; ValueError naming the choices if none."""
    try:
        return _REGISTRY.classes[name]
    except KeyError:
        raise ValueError(f"unknown transfer backend {name!r}; available: "
                         f"{available_backends()}") from None


def create_backend(name: str, **config: Any) -> TransferBackend:
    """Instantiate backend ``name``; ``config`` must include ``compat_hash``."""
    return backend_class(name)(**config)
