"""Generates the Python stubs from epd.proto with grpcio-tools.

Stubs are not committed: they are produced at install (scripts/setup.sh) or on first
import when missing or older than the .proto (a stamp holds the .proto's hash), so they
always match the protobuf runtime installed beside them.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "epd.proto"
STAMP = HERE / "epd_pb2.stamp"


def _proto_hash() -> str:
    return hashlib.sha256(PROTO.read_bytes()).hexdigest()


def is_current() -> bool:
    return (HERE / "epd_pb2.py").is_file() and (HERE / "epd_pb2_grpc.py").is_file() \
        and STAMP.is_file() and STAMP.read_text().strip() == _proto_hash()


def generate() -> None:
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise RuntimeError("grpcio-tools is needed to generate the gRPC stubs: pip install grpcio-tools") from exc
    # Generate into a scratch directory and move into place, so concurrent processes
    # never import a half-written module.
    with tempfile.TemporaryDirectory(dir=HERE) as scratch:
        out = Path(scratch) / "proto"
        out.mkdir()
        code = protoc.main(["grpc_tools.protoc", f"-I{HERE.parent}", f"--python_out={scratch}",
                            f"--grpc_python_out={scratch}", str(PROTO)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit {code})")
        for name in ("epd_pb2.py", "epd_pb2_grpc.py"):
            os.replace(out / name, HERE / name)
        STAMP.write_text(_proto_hash() + "\n")


def ensure_generated() -> None:
    if not is_current():
        generate()


if __name__ == "__main__":
    generate()
    print(f"generated stubs in {HERE}", file=sys.stderr)
