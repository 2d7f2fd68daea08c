"""Requests that do not parse are the caller's error. gRPC's own deserialization answers
a corrupt body with INTERNAL ("Exception deserializing request!"), a server fault by
its code; `DecodeErrorInterceptor` parses unary requests itself and answers
INVALID_ARGUMENT instead."""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

Deserializer = Callable[[bytes], Any]


async def _parse(raw: bytes, deserialize: Deserializer | None, context: grpc.aio.ServicerContext) -> Any:
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except DecodeError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {exc}")


def _unary(behavior: Callable[..., Awaitable[Any]], deserialize: Deserializer | None) -> Callable[..., Awaitable[Any]]:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(await _parse(raw, deserialize, context), context)
    return handle


def _streaming(behavior: Callable[..., AsyncIterator[Any]],
               deserialize: Deserializer | None) -> Callable[..., AsyncIterator[Any]]:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for item in behavior(await _parse(raw, deserialize, context), context):
            yield item
    return handle


def parsing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with its unary request parsed inside the call (client-streaming
    handlers are returned as they are)."""
    if handler.request_streaming:
        return handler
    serialize, deserialize = handler.response_serializer, handler.request_deserializer
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_streaming(handler.unary_stream, deserialize),
                                                    response_serializer=serialize)
    return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, deserialize),
                                               response_serializer=serialize)


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """A corrupt request body is INVALID_ARGUMENT, not INTERNAL."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        return handler if handler is None else parsing_handler(handler)
