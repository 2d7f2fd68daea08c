"""Wire API. `epd_pb2` / `epd_pb2_grpc` are generated from epd.proto by `proto.build`
(run by scripts/setup.sh, and on first import when missing or stale)."""
from __future__ import annotations

from proto.build import ensure_generated

ensure_generated()

from proto import epd_pb2, epd_pb2_grpc  # noqa: E402

__all__ = ["epd_pb2", "epd_pb2_grpc"]
