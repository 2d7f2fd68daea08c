"""kv_transfer: move KV-cache pages (and embeddings) between workers.

``create_backend(name, compat_hash=..., **config)`` returns a ``TransferBackend``;
see ``kv_transfer.base`` for the contract and its rationale.

Every backend is registered on import, including those whose library is
optional (``mooncake``, ``nixl``) or that need a GPU (``cuda_ipc``): their
modules import that library only when an endpoint is created, so
``available_backends()`` lists all of them on every machine, and
``backend_availability()`` says which ones can run here and why not. Creating
a ``mooncake``/``nixl`` endpoint without its package raises ``TransferError``
with the pip command; ``cuda_ipc``'s ``start()`` raises without CUDA.
"""

from __future__ import annotations

from . import cuda_ipc as _cuda_ipc  # noqa: F401  (registers "cuda_ipc")
from . import mooncake as _mooncake  # noqa: F401  (registers "mooncake")
from . import nixl as _nixl  # noqa: F401  (registers "nixl")
from . import tcp as _tcp  # noqa: F401  (registers the built-in "tcp" backend)
from .base import (DEFAULT_TIMEOUT_S, EndpointDescriptor, FencingError,
                   IncompatiblePeerError, Notification, PageRun, PeerDisconnectedError,
                   PeerHandle, RegionSpec, RoomReservation, TransferBackend,
                   TransferError, TransferStats, TransferTimeoutError,
                   available_backends, backend_class, coalesce, compat_hash,
                   create_backend, register_backend)
from .onesided import EngineBackend
from .options import TransferOptionError, option_fields, parse_transfer_options


def backend_availability() -> dict[str, str | None]:
    """Registered backend -> None if it can run on this machine, else the reason
    (missing package, no CUDA). Cheap: imports no engine library."""
    from .base import _REGISTRY
    return {name: cls.unavailable_reason() if issubclass(cls, EngineBackend) else None
            for name, cls in sorted(_REGISTRY.classes.items())}


__all__ = [
    "DEFAULT_TIMEOUT_S", "EndpointDescriptor", "FencingError", "IncompatiblePeerError",
    "Notification", "PageRun", "PeerDisconnectedError", "PeerHandle", "RegionSpec",
    "RoomReservation", "TransferBackend", "TransferError", "TransferStats",
    "TransferTimeoutError", "available_backends", "coalesce", "compat_hash",
    "backend_availability", "backend_class", "create_backend", "register_backend",
    "TransferOptionError", "option_fields", "parse_transfer_options",
]
