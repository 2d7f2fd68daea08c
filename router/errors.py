"""Errors a request can end in before its first token, each knowing its HTTP status,
its gRPC code and the label it is counted under in the metrics."""
from __future__ import annotations

import math

import grpc


class RouterError(Exception):
    """Base: a request the router cannot serve, with a message for the client."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    error_type = "internal_error"
    code = "internal_error"
    metric_label = "error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def http_headers(self) -> dict[str, str]:
        """Headers the HTTP answer carries besides the body."""
        return {}

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata of the gRPC status."""
        return ()


class InvalidRequest(RouterError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"
    code = "invalid_request"
    metric_label = "invalid"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(RouterError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"
    code = "model_not_found"
    metric_label = "not_found"


class SessionNotFound(RouterError):
    """A session id the router does not know (never opened, closed, or expired)."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"
    code = "session_not_found"
    metric_label = "not_found"


class PinNotFound(SessionNotFound):
    """A pin id the router does not know."""

    code = "pin_not_found"


class PinRefused(RouterError):
    """A pin no worker could take: over every worker's pinned-page cap."""

    http_status = 409
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "invalid_request_error"
    code = "pin_cap_exceeded"
    metric_label = "rejected"


class RequestTooLarge(RouterError):
    http_status = 413
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"
    code = "request_too_large"
    metric_label = "invalid"


class Overloaded(RouterError):
    """The router or every worker is full: the client should come back after
    `retry_after` seconds (HTTP `Retry-After`, whole seconds; gRPC `retry-after`)."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"
    code = "too_many_requests"
    metric_label = "rejected"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after", f"{self.retry_after:g}"),)


class NoHealthyWorkers(RouterError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "service_unavailable_error"
    code = "no_healthy_workers"
    metric_label = "unavailable"


class WorkerFailed(RouterError):
    """A worker answered with an error (or not in time) before the first token."""

    http_status = 502
    error_type = "upstream_error"
    code = "worker_error"

    def __init__(self, message: str, grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        super().__init__(message)
        self.grpc_code = grpc_code
        if grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.http_status, self.code = 504, "worker_timeout"


class Unauthenticated(RouterError):
    """No API key, or one the router does not accept (router/auth.py)."""

    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    error_type = "authentication_error"
    code = "invalid_api_key"
    metric_label = "unauthenticated"


class PermissionDenied(RouterError):
    """A valid key without the right to this endpoint (a user key on an admin route)."""

    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    error_type = "permission_error"
    code = "permission_denied"
    metric_label = "unauthenticated"
