"""The cluster token on a worker's gRPC server: every call (the router's Generate,
Status and FlushCache, decode's Prefill, prefill's Encode) must carry it, or is refused
with UNAUTHENTICATED before its request is read. The worker's own outgoing calls carry
it through `proto.auth.cluster_channel`."""
from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from proto.auth import CLUSTER_TOKEN_KEY, check_secret, metadata_value, rejecting_handler, secret_matches

CLUSTER_TOKEN_ENV = "EPD_CLUSTER_TOKEN"


def cluster_token_from(flag: str | None) -> str | None:
    """The flag's token, else the environment's (preferred: not visible in `ps`)."""
    token = flag if flag is not None else os.environ.get(CLUSTER_TOKEN_ENV) or None
    return None if token is None else check_secret(token, "the cluster token")


class ClusterTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose `x-epd-cluster-token` metadata is not the token."""

    def __init__(self, token: str) -> None:
        self._accepted = (token,)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        given = metadata_value(details.invocation_metadata, CLUSTER_TOKEN_KEY)
        if handler is None or secret_matches(given, self._accepted):
            return handler
        return rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")


def router_credentials(ca_path: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials that trust the router's CA certificate; None: plaintext."""
    if not ca_path:
        return None
    with open(ca_path, "rb") as handle:
        return grpc.ssl_channel_credentials(root_certificates=handle.read())


def server_interceptors(token: str | None) -> list[grpc.aio.ServerInterceptor]:
    return [ClusterTokenInterceptor(token)] if token else []
