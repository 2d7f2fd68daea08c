"""kv_transfer: move KV-cache pages (and embeddings) between workers.

``create_backend(name, compat_hash=..., **config)`` returns a ``TransferBackend``;
see ``kv_transfer.base`` for the contract and its rationale.
"""

from __future__ import annotations

from . import tcp as _tcp  # noqa: F401  (registers the built-in "tcp" backend)
from .base import (DEFAULT_TIMEOUT_S, EndpointDescriptor, FencingError,
                   IncompatiblePeerError, Notification, PageRun, PeerDisconnectedError,
                   PeerHandle, RegionSpec, RoomReservation, TransferBackend,
                   TransferError, TransferStats, TransferTimeoutError,
                   available_backends, coalesce, compat_hash, create_backend,
                   register_backend)

__all__ = [
    "DEFAULT_TIMEOUT_S", "EndpointDescriptor", "FencingError", "IncompatiblePeerError",
    "Notification", "PageRun", "PeerDisconnectedError", "PeerHandle", "RegionSpec",
    "RoomReservation", "TransferBackend", "TransferError", "TransferStats",
    "TransferTimeoutError", "available_backends", "coalesce", "compat_hash",
    "create_backend", "register_backend",
]
