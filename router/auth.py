"""Who may call what on the router: user API keys, the admin key, the cluster token.

HTTP (FastAPI dependencies, errors in OpenAI's shape):

    require_user   /v1/* and /cluster. No user keys configured: open. Otherwise
                   `Authorization: Bearer KEY` with a user key (or the admin key);
                   missing or unknown: 401.
    require_admin  admin routes. With --admin-key: only `Bearer ADMIN_KEY`; a user key
                   gets 403, anything else 401. Without an admin key, admin routes are
                   reachable only when the router binds a loopback address (then they
                   need what user routes need); on any other address they are refused
                   with 403, so an exposed router never has unguarded admin routes.
    require_metrics  /metrics, per --metrics-auth: open (default), user or admin.

/health and /openapi.json stay open (probes; the schema holds no secrets).

gRPC (`RouterAuthInterceptor`): the Router service needs `authorization: Bearer KEY`
metadata like /v1/* (Router/Health stays open, like /health); the Registry service
needs `x-epd-cluster-token` when a cluster token is set. Refusals are UNAUTHENTICATED.

Use on a route: `@app.post("/admin/x", dependencies=[Depends(require_admin)])` in an app
that `install(app, policy)` prepared.
"""
from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from proto.auth import (AUTHORIZATION_KEY, CLUSTER_TOKEN_KEY, bearer_token, metadata_value, rejecting_handler,
                        secret_matches)
from router.config import RouterConfig
from router.errors import PermissionDenied, RouterError, Unauthenticated
from router.openai_format import error_body

log = logging.getLogger("router.auth")
_ROUTER_SERVICE = "/epd.v1.Router/"
_REGISTRY_SERVICE = "/epd.v1.Registry/"
_OPEN_METHODS = frozenset({"/epd.v1.Router/Health"})


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1; a wildcard (0.0.0.0, ::) is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AccessPolicy:
    """The router's credentials and the rules above (no state besides them)."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_key: str | None = field(default=None, repr=False)
    loopback: bool = True  # the router binds a loopback address only
    metrics_auth: str = "open"

    @classmethod
    def from_config(cls, config: RouterConfig) -> AccessPolicy:
        return cls(config.api_keys, config.admin_key, is_loopback(config.host), config.metrics_auth)

    def check_user(self, token: str | None) -> None:
        if not self.api_keys:
            return
        accepted = (*self.api_keys, *((self.admin_key,) if self.admin_key else ()))
        if not secret_matches(token, accepted):
            raise Unauthenticated("missing or invalid API key: send `Authorization: Bearer KEY`")

    def check_admin(self, token: str | None) -> None:
        if self.admin_key is None:
            if not self.loopback:
                raise PermissionDenied("admin endpoints are disabled: this router binds a non-loopback "
                                       "address and no admin key is set (--admin-key)")
            self.check_user(token)
            return
        if secret_matches(token, (self.admin_key,)):
            return
        if secret_matches(token, self.api_keys):
            raise PermissionDenied("this endpoint needs the admin key; a user API key is not enough")
        raise Unauthenticated("missing or invalid admin key: send `Authorization: Bearer ADMIN_KEY`")

    def check_metrics(self, token: str | None) -> None:
        if self.metrics_auth == "user":
            self.check_user(token)
        elif self.metrics_auth == "admin":
            self.check_admin(token)


# -- HTTP ------------------------------------------------------------------------------


def install(app: FastAPI, policy: AccessPolicy) -> None:
    """Give `app` the policy its dependencies read, and answer their errors (every
    RouterError raised by a dependency) in OpenAI's error shape."""
    app.state.access_policy = policy
    app.add_exception_handler(RouterError, _router_error_response)


async def _router_error_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RouterError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else exc.http_headers()
    return JSONResponse(error_body(exc), status_code=exc.http_status, headers=headers)


def _policy_and_token(request: Request) -> tuple[AccessPolicy, str | None]:
    return request.app.state.access_policy, bearer_token(request.headers.get("authorization"))


async def require_user(request: Request) -> None:
    """FastAPI dependency: a user API key (when keys are configured)."""
    policy, token = _policy_and_token(request)
    policy.check_user(token)


async def require_admin(request: Request) -> None:
    """FastAPI dependency: the admin key (see the module docstring without one)."""
    policy, token = _policy_and_token(request)
    policy.check_admin(token)


async def require_metrics(request: Request) -> None:
    """FastAPI dependency for /metrics, per --metrics-auth."""
    policy, token = _policy_and_token(request)
    policy.check_metrics(token)


# -- gRPC ------------------------------------------------------------------------------


class RouterAuthInterceptor(grpc.aio.ServerInterceptor):
    """API keys on the Router service, the cluster token on the Registry service."""

    def __init__(self, policy: AccessPolicy, cluster_token: str | None) -> None:
        self._policy = policy
        self._cluster_token = cluster_token

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        refusal = None if handler is None else self._refusal(details)
        if refusal is None:
            return handler
        return rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, refusal)

    def _refusal(self, details: grpc.HandlerCallDetails) -> str | None:
        method, metadata = details.method, details.invocation_metadata
        if method.startswith(_REGISTRY_SERVICE) and self._cluster_token is not None:
            if not secret_matches(metadata_value(metadata, CLUSTER_TOKEN_KEY), (self._cluster_token,)):
                log.warning("refused %s: missing or wrong cluster token", method)
                return "missing or wrong cluster token"
        elif method.startswith(_ROUTER_SERVICE) and method not in _OPEN_METHODS:
            try:
                self._policy.check_user(bearer_token(metadata_value(metadata, AUTHORIZATION_KEY)))
            except RouterError as exc:
                return exc.message
        return None


def router_interceptors(config: RouterConfig) -> list[grpc.aio.ServerInterceptor]:
    """Credentials first (a refused call is never parsed), then parsing that answers a
    corrupt body with INVALID_ARGUMENT."""
    from proto.decoding import DecodeErrorInterceptor
    policy = AccessPolicy.from_config(config)
    checks = [] if not policy.api_keys and config.cluster_token is None else [
        RouterAuthInterceptor(policy, config.cluster_token)]
    return [*checks, DecodeErrorInterceptor()]
