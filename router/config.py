"""The router's configuration: a frozen dataclass and the command-line options that
fill it. `epd router` and `python -m router` share `add_router_arguments`."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Sequence

ROLES = ("encode", "prefill", "decode")
METRICS_AUTH = ("open", "user", "admin")  # who may read /metrics
# Secrets from the environment (comma-separated keys): unlike flags, not visible in `ps`.
API_KEY_ENV, ADMIN_KEY_ENV, CLUSTER_TOKEN_ENV = "EPD_API_KEY", "EPD_ADMIN_KEY", "EPD_CLUSTER_TOKEN"


@dataclass(frozen=True)
class WorkerAddress:
    """A worker named on the command line: `ADDR` or `ID=ADDR`."""

    role: str
    id: str
    address: str


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router needs to start. Durations are seconds."""

    host: str = "127.0.0.1"
    port: int = 8000                       # HTTP (OpenAI API); 0 picks a free port
    grpc_port: int = 50051                 # Router + Registry services; 0 picks a free port
    model: str | None = None               # model directory; None: the built-in tiny model
    served_model_name: str | None = None   # defaults to the model directory's name
    max_model_len: int | None = None       # defaults to config.json's max_position_embeddings
    prefill: tuple[str, ...] = ()          # static prefill workers, `ADDR` or `ID=ADDR`
    decode: tuple[str, ...] = ()           # static decode workers
    encode: tuple[str, ...] = ()           # static encode workers (vision-language models)
    expect_encode: int = 0                 # /health needs this many healthy encode workers
    expect_prefill: int = 0                # /health needs this many healthy prefill workers
    expect_decode: int = 1                 # ... and this many healthy decode workers
    policy: str = "prefix_aware"
    max_prefill_candidates: int = 3        # prefill workers handed to decode, best first
    max_encode_candidates: int = 3         # encode workers per image, best first
    force_remote_prefill: bool = False     # tell decode to skip its local-prefill threshold
    # One DecodeWorker.Stream per decode worker carries all its requests, tokens batched
    # per step (router/decode_mux.py); off: one Generate call per request.
    decode_multiplex: bool = True
    health_interval: float = 0.5           # between two Status polls of one worker
    health_timeout: float = 1.0            # of one Status call
    unhealthy_after: float = 2.0           # failing this long takes a worker out of rotation
    forget_after: float = 60.0             # a registered worker down this long is dropped
    max_retries: int = 2                   # decode retries before the first token
    # Faults after the first token (router/dispatch.py): the request migrates to another
    # decode worker, resumed from prompt + the tokens already streamed.
    max_migrations: int = 3                # per request
    migration_timeout: float = 30.0        # a migrating request waits this long for a decode worker
    breaker_failures: int = 3              # failures in a row that open a worker's circuit breaker
    breaker_cooldown: float = 5.0          # open this long, then one probe call (router/breaker.py)
    retry_after: float = 1.0               # seconds in Retry-After (HTTP) / retry-after (gRPC) of a 429
    # Sessions (router/sessions.py): a session's turns stay on its decode (and prefill) worker.
    max_sessions: int = 65536              # sessions remembered; the least recently used is forgotten
    session_idle_timeout: float = 300.0    # a session is forgotten this long after its last turn
    first_token_timeout: float = 120.0     # decode stream: until the first token
    token_timeout: float = 60.0            # decode stream: between two later messages
    request_timeout: float = 3600.0        # deadline of one decode stream
    abort_timeout: float = 1.0             # of an Abort call to a worker
    max_concurrent_requests: int = 256     # generating at once; more wait in the queue
    max_queued_requests: int = 1024        # waiting for a slot; more get 429 / RESOURCE_EXHAUSTED
    max_request_bytes: int = 64 * 1024 * 1024  # HTTP body limit (413); images come base64 in it
    max_images_per_request: int = 8
    max_image_bytes: int = 20 * 1024 * 1024  # one encoded image
    max_image_pixels: int = 4096 * 4096    # one decoded image (width x height)
    allow_image_urls: bool = False         # fetch http(s) image URLs (off: data: URLs only)
    image_fetch_timeout: float = 10.0      # of one http(s) image fetch
    log_level: str = "info"
    # Security (router/auth.py). No keys: the API is open, as on a trusted network.
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # user keys for /v1/* and gRPC Router
    admin_key: str | None = field(default=None, repr=False)    # admin routes (see router/auth.py)
    cluster_token: str | None = field(default=None, repr=False)  # Registry calls and calls to workers
    metrics_auth: str = "open"             # /metrics: open (scrapers), user or admin key
    tls_cert: str | None = None            # PEM certificate (chain) for HTTPS and gRPC TLS
    tls_key: str | None = None             # its PEM private key
    # Pools at run time (router/pools.py, router/autoscaler.py).
    launcher: str | None = None            # URL of the launcher that starts workers (epd up)
    drain_timeout: float = 600.0           # a worker leaving a pool: how long its requests may run
    autoscale: tuple[str, ...] = ()        # POOL=MIN:MAX, each pool scaled on its own load
    autoscale_interval: float = 2.0        # between two autoscaler decisions
    autoscale_window: float = 30.0         # latencies of the last this-many seconds count
    autoscale_up_cooldown: float = 10.0    # after a change, no growth of that pool this long
    autoscale_down_cooldown: float = 30.0  # ... and no shrinking this long
    autoscale_ttft: float = 2.0            # prefill target: TTFT p90 (s)
    autoscale_itl: float = 0.1             # decode target: ITL p90 (s)
    autoscale_prefill_tokens: int = 4096   # prefill target: queued prompt tokens per worker
    autoscale_decode_kv: float = 0.8       # decode target: fraction of KV pages in use
    autoscale_decode_running: int = 0      # decode target: running requests per worker (0: unused)
    autoscale_encode_images: int = 16      # encode target: queued images per worker
    # Kubernetes discovery (router/k8s_discovery.py): pools whose pods are watched.
    k8s_selector: tuple[str, ...] = ()     # `ROLE=LABEL_SELECTOR`, repeatable; none: discovery off
    k8s_namespace: str | None = None       # None: the service account's namespace
    k8s_api_server: str | None = None      # None: in-cluster (KUBERNETES_SERVICE_HOST/PORT)
    k8s_port_name: str = "grpc"            # the container port that is the worker's gRPC port
    k8s_watch_timeout: float = 60.0        # of one watch call (the server ends it)
    k8s_removal_grace: float = 30.0        # calls running on a pod that left may finish this long

    def static_workers(self) -> list[WorkerAddress]:
        out = []
        for role, specs in (("encode", self.encode), ("prefill", self.prefill), ("decode", self.decode)):
            out.extend(parse_worker_spec(role, spec, index) for index, spec in enumerate(specs))
        return out


def parse_worker_spec(role: str, spec: str, index: int) -> WorkerAddress:
    """`host:port` gets the id `{role}-{index}`; `name=host:port` names it."""
    worker_id, sep, address = spec.partition("=")
    if not sep:
        worker_id, address = f"{role}-{index}", spec
    if not address or ":" not in address:
        raise ValueError(f"--{role} {spec!r}: expected HOST:PORT or ID=HOST:PORT")
    return WorkerAddress(role, worker_id, address)


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's options, with RouterConfig's defaults."""
    d = RouterConfig()
    add = parser.add_argument
    add("--host", default=d.host, help="address to bind HTTP and gRPC to")
    add("--port", type=int, default=d.port, help="HTTP port (OpenAI API)")
    add("--grpc-port", type=int, default=d.grpc_port, help="gRPC port (Router and Registry services)")
    add("--model", default=d.model, help="model directory (default: built-in tiny model)")
    add("--served-model-name", default=d.served_model_name)
    add("--max-model-len", type=int, default=d.max_model_len)
    add("--prefill", action="append", default=[], metavar="[ID=]ADDR", help="prefill worker (repeatable)")
    add("--decode", action="append", default=[], metavar="[ID=]ADDR", help="decode worker (repeatable)")
    add("--encode", action="append", default=[], metavar="[ID=]ADDR", help="encode worker (repeatable)")
    add("--expect-encode", type=int, default=d.expect_encode,
        help="healthy encode workers /health waits for (beyond those named)")
    add("--expect-prefill", type=int, default=d.expect_prefill,
        help="healthy prefill workers /health waits for (beyond those named)")
    add("--expect-decode", type=int, default=d.expect_decode)
    add("--policy", default=d.policy, help="routing policy: prefix_aware, load, round_robin, random")
    add("--max-prefill-candidates", type=int, default=d.max_prefill_candidates)
    add("--max-encode-candidates", type=int, default=d.max_encode_candidates)
    add("--force-remote-prefill", action="store_true")
    add("--decode-multiplex", action=argparse.BooleanOptionalAction, default=d.decode_multiplex,
        help="send every request to a decode worker over one multiplexed stream, its tokens batched per "
             "step (--no-decode-multiplex: one Generate call per request)")
    add("--health-interval", type=float, default=d.health_interval)
    add("--health-timeout", type=float, default=d.health_timeout)
    add("--unhealthy-after", type=float, default=d.unhealthy_after)
    add("--forget-after", type=float, default=d.forget_after)
    add("--max-retries", type=int, default=d.max_retries, help="decode retries before the first token")
    add("--max-migrations", type=int, default=d.max_migrations,
        help="times one request may move to another decode worker after tokens streamed")
    add("--migration-timeout", type=float, default=d.migration_timeout,
        help="seconds a migrating request waits for a decode worker to take it")
    add("--breaker-failures", type=int, default=d.breaker_failures,
        help="failures in a row that open a worker's circuit breaker")
    add("--breaker-cooldown", type=float, default=d.breaker_cooldown,
        help="seconds a breaker stays open before one probe call")
    add("--retry-after", type=float, default=d.retry_after,
        help="seconds a refused (429 / RESOURCE_EXHAUSTED) client is told to wait")
    add("--max-sessions", type=int, default=d.max_sessions,
        help="sessions whose turns the router keeps on their workers (least recently used forgotten first)")
    add("--session-idle-timeout", type=float, default=d.session_idle_timeout,
        help="seconds after its last turn that a session is forgotten")
    add("--first-token-timeout", type=float, default=d.first_token_timeout)
    add("--token-timeout", type=float, default=d.token_timeout)
    add("--request-timeout", type=float, default=d.request_timeout)
    add("--max-concurrent-requests", type=int, default=d.max_concurrent_requests)
    add("--max-queued-requests", type=int, default=d.max_queued_requests)
    add("--max-request-bytes", type=int, default=d.max_request_bytes)
    add("--max-images-per-request", type=int, default=d.max_images_per_request)
    add("--max-image-bytes", type=int, default=d.max_image_bytes, help="size limit of one encoded image")
    add("--max-image-pixels", type=int, default=d.max_image_pixels, help="width x height limit of one image")
    add("--allow-image-urls", action="store_true",
        help="fetch http(s) image URLs (default: only data: URLs are accepted)")
    add("--image-fetch-timeout", type=float, default=d.image_fetch_timeout)
    add("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    _add_security_arguments(parser)
    _add_pool_arguments(parser)
    add_k8s_arguments(parser)


def _add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    d, add = RouterConfig(), parser.add_argument
    add("--launcher", default=None, metavar="URL", help="launcher that starts workers when a pool grows "
        "(epd up passes its own); without one, pools can only shrink")
    add("--drain-timeout", type=float, default=d.drain_timeout,
        help="seconds a leaving worker's running requests may take")
    add("--autoscale", action="append", default=[], metavar="POOL=MIN:MAX",
        help="scale POOL (encode, prefill, decode) between MIN and MAX on its load (repeatable)")
    for name, kind, text in (
            ("interval", float, "seconds between decisions"), ("window", float, "latency window (s)"),
            ("up-cooldown", float, "seconds after a change before a pool grows again"),
            ("down-cooldown", float, "seconds after a change before a pool shrinks"),
            ("ttft", float, "prefill target TTFT p90 (s)"), ("itl", float, "decode target ITL p90 (s)"),
            ("prefill-tokens", int, "prefill target queued prompt tokens per worker"),
            ("decode-kv", float, "decode target fraction of KV pages in use"),
            ("decode-running", int, "decode target running requests per worker (0: unused)"),
            ("encode-images", int, "encode target queued images per worker")):
        attr = "autoscale_" + name.replace("-", "_")
        add(f"--autoscale-{name}", type=kind, default=getattr(d, attr), dest=attr, help=text)


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--api-key", action="append", default=[], dest="api_keys", metavar="KEY",
        help=f"accept this user API key (repeatable; also env {API_KEY_ENV}, comma-separated)")
    add("--admin-key", default=None, help=f"key for admin endpoints (also env {ADMIN_KEY_ENV})")
    add("--cluster-token", default=None,
        help=f"shared secret of router and workers (also env {CLUSTER_TOKEN_ENV}, which keeps it out of `ps`)")
    add("--metrics-auth", default="open", choices=METRICS_AUTH, help="who may read /metrics")
    add("--tls-cert", default=None, metavar="PEM", help="serve HTTPS and gRPC over TLS with this certificate")
    add("--tls-key", default=None, metavar="PEM", help="the TLS certificate's private key")


def secrets_from_env(values: dict[str, object]) -> dict[str, object]:
    """Add the environment's keys to the flags' (keys) or fill what no flag set."""
    env_keys = tuple(k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip())
    out = dict(values, api_keys=tuple(values.get("api_keys") or ()) + env_keys)
    for name, env in (("admin_key", ADMIN_KEY_ENV), ("cluster_token", CLUSTER_TOKEN_ENV)):
        if out.get(name) is None:
            out[name] = os.environ.get(env) or None
    return out


def add_k8s_arguments(parser: argparse.ArgumentParser) -> None:
    """Worker discovery through the Kubernetes API (off unless --k8s-selector is given)."""
    d = RouterConfig()
    add = parser.add_argument
    add("--k8s-selector", action="append", default=[], metavar="ROLE=SELECTOR",
        help="discover ROLE's workers as the Ready pods matching this label selector (repeatable)")
    add("--k8s-namespace", default=d.k8s_namespace, help="namespace of the pods (default: the pod's own)")
    add("--k8s-api-server", default=d.k8s_api_server, metavar="URL",
        help="Kubernetes API server (default: in-cluster, with the service account)")
    add("--k8s-port-name", default=d.k8s_port_name, help="name of the worker container's gRPC port")
    add("--k8s-watch-timeout", type=float, default=d.k8s_watch_timeout)
    add("--k8s-removal-grace", type=float, default=d.k8s_removal_grace,
        help="seconds that running calls to a pod that left (unready or deleted) may take to finish")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """Build a RouterConfig from parsed options; unknown attributes are ignored."""
    names = {f.name for f in fields(RouterConfig)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    for key in ("encode", "prefill", "decode", "autoscale", "k8s_selector"):
        values[key] = tuple(values.get(key) or ())
    config = RouterConfig(**secrets_from_env(values))
    validate_config(config)
    return config


def validate_config(config: RouterConfig) -> None:
    from router.policies import policy_names
    if config.policy not in policy_names():
        raise ValueError(f"unknown policy {config.policy!r}; choose one of {policy_names()}")
    for name in ("max_concurrent_requests", "max_request_bytes", "max_prefill_candidates", "max_sessions",
                 "max_image_bytes", "max_image_pixels", "max_encode_candidates"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1")
    for name in ("max_queued_requests", "max_retries", "expect_prefill", "expect_decode", "expect_encode",
                 "max_images_per_request", "max_migrations"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0")
    if config.breaker_failures < 1:
        raise ValueError("breaker_failures must be >= 1")
    for name in ("migration_timeout", "breaker_cooldown", "retry_after", "first_token_timeout", "session_idle_timeout",
                 "token_timeout", "request_timeout", "health_timeout", "abort_timeout"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be > 0")
    if config.image_fetch_timeout <= 0:
        raise ValueError("image_fetch_timeout must be > 0")
    config.static_workers()  # raises on a malformed worker spec
    _validate_security(config)
    autoscale_bounds(config)  # raises on a malformed --autoscale
    if config.drain_timeout <= 0 or config.autoscale_interval <= 0:
        raise ValueError("drain_timeout and autoscale_interval must be > 0")


def autoscale_bounds(config: RouterConfig) -> dict[str, tuple[int, int]]:
    """`--autoscale POOL=MIN:MAX` as {pool: (min, max)}."""
    out: dict[str, tuple[int, int]] = {}
    for spec in config.autoscale:
        pool, _, bounds = spec.partition("=")
        low, sep, high = bounds.partition(":")
        if pool not in ROLES or not sep or not low.isdigit() or not high.isdigit():
            raise ValueError(f"--autoscale {spec!r}: expected POOL=MIN:MAX with POOL one of {ROLES}")
        if int(low) > int(high) or (pool == "decode" and int(low) < 1):
            raise ValueError(f"--autoscale {spec!r}: need MIN <= MAX (and MIN >= 1 for decode)")
        out[pool] = (int(low), int(high))
    return out


def _validate_security(config: RouterConfig) -> None:
    from proto.auth import check_secret
    for key in config.api_keys:
        check_secret(key, "an API key")
    for name in ("admin_key", "cluster_token"):
        value = getattr(config, name)
        if value is not None:
            check_secret(value, name.replace("_", " "))
    if config.admin_key is not None and config.admin_key in config.api_keys:
        raise ValueError("the admin key must differ from every user API key")
    if config.metrics_auth not in METRICS_AUTH:
        raise ValueError(f"metrics_auth must be one of {METRICS_AUTH}")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    from router.k8s_discovery import parse_pool_selector
    for spec in config.k8s_selector:
        parse_pool_selector(spec)
    if config.k8s_watch_timeout < 1 or config.k8s_removal_grace < 0:
        raise ValueError("k8s_watch_timeout must be >= 1 and k8s_removal_grace >= 0")


def parse_config(argv: Sequence[str] | None = None) -> RouterConfig:
    parser = argparse.ArgumentParser(prog="python -m router", description="epd-serve router")
    add_router_arguments(parser)
    return config_from_args(parser.parse_args(argv))
