"""Credentials on the wire, shared by the router and the workers (the metadata names are
part of the protocol, like the messages): a cluster token on control and
worker-to-worker calls, a user API key on the router's public gRPC API.

Checks compare in constant time, and a refused call is answered before its request is
deserialized (the rejecting handler takes raw bytes).
"""
from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, AsyncIterator

import grpc

CLUSTER_TOKEN_KEY = "x-epd-cluster-token"  # gRPC metadata: the cluster token, as is
AUTHORIZATION_KEY = "authorization"  # gRPC metadata: "Bearer <api key>"
BEARER = "bearer "

Metadata = Sequence[tuple[str, str]]


def check_secret(value: str, name: str) -> str:
    """A key or token must be non-empty printable ASCII without spaces: it travels in
    HTTP headers and gRPC metadata, and compares as bytes."""
    if not value or not value.isascii() or not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError(f"{name} must be non-empty printable ASCII without spaces")
    return value


def secret_matches(given: str | None, accepted: Iterable[str]) -> bool:
    """True if `given` equals one of `accepted`. Every accepted secret is compared (in
    constant time each), so the time taken says nothing about which one matched."""
    if given is None:
        return False
    raw = given.encode("utf-8", "surrogateescape")
    found = False
    for secret in accepted:
        found |= hmac.compare_digest(raw, secret.encode("utf-8"))
    return found


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` value; None when it is not one."""
    if header is None or not header[:len(BEARER)].lower() == BEARER:
        return None
    return header[len(BEARER):].strip()


def metadata_value(metadata: Iterable[Any] | None, key: str) -> str | None:
    """The first value of `key` in a call's invocation metadata."""
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


def _rejecter(code: grpc.StatusCode, details: str) -> tuple[Callable[..., Awaitable[None]],
                                                             Callable[..., AsyncIterator[None]]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(code, details)
        yield  # pragma: no cover - abort raises

    return unary, streaming


def rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
                      details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call with `code`; it
    never deserializes the request."""
    unary, streaming = _rejecter(code, details)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


class _MetadataAdder:
    """Adds fixed metadata to every outgoing call of a channel."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = tuple(metadata)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        merged = grpc.aio.Metadata(*tuple(details.metadata or ()), *self._metadata)
        return details._replace(metadata=merged)  # a namedtuple


class _UnaryUnaryAdder(_MetadataAdder, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamAdder(_MetadataAdder, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamStreamAdder(_MetadataAdder, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def metadata_interceptors(metadata: Metadata) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that attach `metadata` to every call of the shapes epd.proto
    has (unary, server-streaming, bidirectional); none when `metadata` is empty."""
    if not metadata:
        return []
    return [_UnaryUnaryAdder(metadata), _UnaryStreamAdder(metadata), _StreamStreamAdder(metadata)]


def cluster_token_metadata(token: str | None) -> Metadata:
    return ((CLUSTER_TOKEN_KEY, token),) if token else ()


def cluster_channel(address: str, options: Sequence[tuple[str, Any]], cluster_token: str | None,
                     credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """A channel whose calls carry the cluster token (when there is one); TLS when
    `credentials` is given. HTTP/2 keepalive is on (proto/keepalive.py)."""
    from proto.keepalive import CLIENT_OPTIONS
    interceptors = metadata_interceptors(cluster_token_metadata(cluster_token))
    options = [*CLIENT_OPTIONS, *options]
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=list(options), interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
