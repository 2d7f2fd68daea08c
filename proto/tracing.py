"""Optional OpenTelemetry tracing of a request across router, decode, prefill and
encode. Off by default: with tracing off every call here is a cheap no-op and the
OpenTelemetry SDK is never imported.

Turn it on per process with `EPD_TRACING` in the environment (`epd up` passes its
environment to every process): `console` prints finished spans as JSON on stdout,
`otlp` sends them to an OTLP collector (`OTEL_EXPORTER_OTLP_ENDPOINT`; needs the
`opentelemetry-exporter-otlp` package). Both need the `otel` extra.

One request is one trace:

    router.generate            (router; root)
      router.decode_attempt    (one per decode worker tried)
        decode.generate        (decode worker)
          decode.remote_prefill  (one per prefill worker tried)
            prefill.prefill      (prefill worker)
              prefill.encode_image  (one per encode worker tried)
                encode.encode       (encode worker)

The context travels in gRPC metadata as W3C `traceparent` (shared here, like the auth
metadata in proto/auth.py, because it is part of the wire protocol). Spans are started
and ended explicitly and passed along as values, never made "current": the servers'
handlers are async generators, where context variables set in one step are not those
of the next.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

ENV = "EPD_TRACING"
_KINDS = {"server", "client", "internal"}
_provider: Any | None = None  # the TracerProvider spans go to; None: tracing is off


class TracingError(ValueError):
    """EPD_TRACING asks for something that cannot be had (unknown exporter, missing package)."""


@contextlib.contextmanager
def enabled(provider: Any | None) -> Iterator[None]:
    """Send the spans of this process to `provider` (an SDK TracerProvider) inside the
    block; None leaves tracing off. The previous provider comes back afterwards."""
    global _provider
    previous, _provider = _provider, provider
    try:
        yield
    finally:
        _provider = previous


def is_on() -> bool:
    return _provider is not None


def provider_from_env(service_name: str, environ: dict[str, str] | None = None) -> Any | None:
    """The TracerProvider EPD_TRACING asks for (None when unset or `off`)."""
    kind = (environ if environ is not None else os.environ).get(ENV, "").strip().lower()
    if kind in ("", "off", "none", "0"):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise TracingError(f"{ENV}={kind} needs OpenTelemetry's SDK: pip install 'epd-serve[otel]'") from None
    if kind == "console":
        exporter: Any = ConsoleSpanExporter()
    elif kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise TracingError(f"{ENV}=otlp needs the opentelemetry-exporter-otlp package") from None
        exporter = OTLPSpanExporter()
    else:
        raise TracingError(f"{ENV}={kind!r}: use console, otlp or off")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class TraceSpan:
    """One span, or nothing when tracing is off (then every method does nothing)."""

    def __init__(self, span: Any | None = None) -> None:
        self._span = span

    def set(self, **attributes: Any) -> None:
        if self._span is not None:
            self._span.set_attributes({f"epd.{k}": v for k, v in attributes.items() if v is not None})

    def event(self, name: str, **attributes: Any) -> None:
        if self._span is not None:
            self._span.add_event(name, {f"epd.{k}": v for k, v in attributes.items()})

    def fail(self, message: str) -> None:
        if self._span is not None:
            from opentelemetry.trace import Status, StatusCode
            self._span.set_status(Status(StatusCode.ERROR, message[:500]))

    def end(self) -> None:
        if self._span is not None:
            self._span.end()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata that makes the callee's spans children of this one."""
        if self._span is None:
            return ()
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(self._span))
        return tuple(carrier.items())


NO_SPAN = TraceSpan()


def start(name: str, parent: TraceSpan | Iterable[Any] | None = None, kind: str = "internal",
          **attributes: Any) -> TraceSpan:
    """Start a span: a child of `parent` (a span of this process, or a gRPC call's
    invocation metadata carrying `traceparent`), else a new trace."""
    if _provider is None:
        return NO_SPAN
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind
    assert kind in _KINDS, kind
    context = None
    if isinstance(parent, TraceSpan):
        context = trace.set_span_in_context(parent._span) if parent._span is not None else None
    elif parent is not None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        carrier = {str(item[0]): _text(item[1]) for item in parent}
        context = TraceContextTextMapPropagator().extract(carrier)
    span = _provider.get_tracer("epd-serve").start_span(name, context=context, kind=getattr(SpanKind, kind.upper()))
    traced = TraceSpan(span)
    traced.set(**attributes)
    return traced


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)
