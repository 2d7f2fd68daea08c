"""A gRPC status code carried inside a message (DecodeStreamEvent.error_code): its number,
and back. Both ends of DecodeWorker.Stream use these."""
from __future__ import annotations

import grpc

_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def to_wire(code: grpc.StatusCode) -> int:
    return code.value[0]


def from_wire(number: int) -> grpc.StatusCode:
    """The code of that number; UNKNOWN for a number gRPC does not define."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
