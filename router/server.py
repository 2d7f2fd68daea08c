"""Running the router: gRPC (Router + Registry services) and HTTP (uvicorn) on one
event loop, with the health monitor. `RouterApp` starts and stops it in-process (tests
use it with port 0); `serve` runs it until SIGINT or SIGTERM."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from pathlib import Path
import sys
from typing import Callable, Iterator

import grpc
import uvicorn

from engine.config import ModelConfig
from engine.model_path import resolve_model_path
from engine.multimodal import MultimodalInfo, read_multimodal_info
from engine.tokenizer import Tokenizer
from proto import tracing
from router.auth import router_interceptors
from router.autoscaler import Autoscaler
from router.config import RouterConfig, validate_config
from router.grpc_server import add_services
from router.http_server import create_app
from router.k8s_discovery import discovery_from_config
from router.metrics import RouterMetrics
from router.pools import PoolManager
from proto.keepalive import SERVER_OPTIONS as SERVER_KEEPALIVE
from router.registry import CHANNEL_OPTIONS, HealthMonitor, WorkerRegistry
from router.service import ModelInfo, RouterService

log = logging.getLogger("router")


def load_model_info(config: RouterConfig) -> tuple[Tokenizer, ModelInfo, MultimodalInfo | None]:
    path = resolve_model_path(config.model)
    model_config = ModelConfig.from_pretrained(path)
    tokenizer = Tokenizer.from_pretrained(path)
    context = model_config.max_position_embeddings
    if config.max_model_len is not None:
        context = min(context, config.max_model_len)
    name = config.served_model_name or (config.model if config.model not in (None, "") else Path(path).name)
    vocab = max(model_config.vocab_size, tokenizer.vocab_size)
    return tokenizer, ModelInfo(name=str(name), max_model_len=context, vocab_size=vocab), read_multimodal_info(path)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the router owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """The HTTP listener. Created with proto IPPROTO_TCP (not 0) because asyncio sets
    TCP_NODELAY only on accepted sockets of that proto: with proto 0, each response's
    small SSE writes queued behind Nagle and the client's delayed ACK (about 40 ms per
    keep-alive request). TCP_NODELAY on the listener is inherited too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class RouterApp:
    def __init__(self, config: RouterConfig) -> None:
        validate_config(config)
        self.config = config
        tokenizer, model, multimodal = load_model_info(config)
        self.registry = WorkerRegistry(config)
        self.metrics = RouterMetrics(self.registry.handles, model.name)
        self.service = RouterService(config, self.registry, tokenizer, model, self.metrics, multimodal)
        self.monitor = HealthMonitor(self.registry, config)
        self.service.pools = PoolManager(config, self.registry)
        self.autoscaler = Autoscaler(config, self.registry, self.service.pools, self.service.latency,
                                     self.metrics.registry)
        self.discovery = discovery_from_config(config, self.registry)  # None without --k8s-selector
        self.http_port = 0
        self.grpc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.monitor.start()
        self.autoscaler.start()
        self.service.pins.start()
        if self.discovery is not None:
            self.discovery.start()
        self._grpc = grpc.aio.server(options=[*CHANNEL_OPTIONS, *SERVER_KEEPALIVE],
                                     interceptors=router_interceptors(self.config))
        add_services(self._grpc, self.service)
        self.grpc_port = self._add_grpc_port(f"{self.config.host}:{self.config.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC to {self.config.host}:{self.config.grpc_port}")
        await self._grpc.start()
        sock = _bind(self.config.host, self.config.port)
        self.http_port = sock.getsockname()[1]
        # httptools: its response writes cost a fraction of h11's per SSE chunk.
        uv_config = uvicorn.Config(create_app(self.service), http="httptools", log_level=self.config.log_level,
                                   access_log=False, lifespan="off", timeout_graceful_shutdown=5,
                                   ssl_certfile=self.config.tls_cert, ssl_keyfile=self.config.tls_key)
        self._http = _EmbeddedUvicorn(uv_config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]), name="router-http")
        while not self._http.started:
            if self._http_task.done():
                await self._http_task  # raises the startup error
                raise OSError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)
        log.info("router serving %s: HTTP%s on %s:%d, gRPC on %s:%d, policy %s", self.service.model.name,
                 "S" if self.config.tls_cert else "", self.config.host, self.http_port, self.config.host,
                 self.grpc_port, self.config.policy)

    def _add_grpc_port(self, address: str) -> int:
        assert self._grpc is not None
        if self.config.tls_cert is None or self.config.tls_key is None:
            return self._grpc.add_insecure_port(address)
        key, cert = Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes()
        return self._grpc.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))

    async def stop(self, grace: float = 2.0) -> None:
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await asyncio.gather(self._http_task, return_exceptions=True)
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self.autoscaler.stop()
        await self.service.pins.stop()
        await self.service.pools.close()
        if self.discovery is not None:
            await self.discovery.stop()
        await self.monitor.stop()
        await self.service.dispatcher.close()
        await self.registry.close()


async def serve(config: RouterConfig) -> None:
    """Run the router until SIGINT or SIGTERM, then shut down cleanly."""
    app = RouterApp(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await app.stop()


def run_router(build_config: Callable[[], RouterConfig], prog: str) -> int:
    """Entry point shared by `epd router` and `python -m router`: build the config
    (a ValueError is a usage error, exit 2), set up logging, serve until stopped."""
    try:
        config = build_config()
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        provider = tracing.provider_from_env("epd-router")
    except tracing.TracingError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tracing.enabled(provider):
        try:
            asyncio.run(serve(config))
        finally:
            if provider is not None:
                provider.shutdown()  # flushes the spans still batched
    return 0
