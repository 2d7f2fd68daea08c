"""Fixtures: an in-process router (RouterApp on ephemeral ports) in front of fake
decode and prefill workers."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.server import RouterApp
from tests.router.fakes import SCRIPT_TEXT, DecodeBehaviour, FakeDecodeWorker, FakePrefillWorker

FAST_HEALTH = dict(health_interval=0.1, health_timeout=0.5, unhealthy_after=0.5)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> float:
    """Seconds it took for `predicate` to hold; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


@dataclass
class Cluster:
    app: RouterApp
    decodes: list[FakeDecodeWorker]
    prefills: list[FakePrefillWorker]
    tokenizer: Tokenizer
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.app.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.app.grpc_port}"

    @property
    def model(self) -> str:
        return self.app.service.model.name


MakeCluster = Callable[..., Awaitable[Cluster]]


def encode_threads(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """Make every request body count as large (tokenized off the loop) and record the
    thread each of the router's `encode` calls runs on."""
    import router.service
    monkeypatch.setattr(router.service, "OFF_LOOP_BYTES", 16)
    threads: list[threading.Thread] = []
    tokenizer = cluster.app.service.tokenizer
    encode = tokenizer.encode

    def spy(text: str, add_special_tokens: bool = True) -> list[int]:
        threads.append(threading.current_thread())
        return encode(text, add_special_tokens)

    monkeypatch.setattr(tokenizer, "encode", spy)
    return threads


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path: Any) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="session")
def script(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False)


@pytest.fixture
async def make_cluster(tokenizer: Tokenizer, script: list[int]) -> AsyncIterator[MakeCluster]:
    started: list[Cluster] = []

    async def make(decode: int = 1, prefill: int = 0, behaviour: DecodeBehaviour | None = None,
                   wait_ready: bool = True, **overrides: Any) -> Cluster:
        decodes = [FakeDecodeWorker(f"d{i}", dataclasses.replace(behaviour or DecodeBehaviour(), script=script))
                   for i in range(decode)]
        prefills = [FakePrefillWorker(f"p{i}") for i in range(prefill)]
        for worker in [*decodes, *prefills]:
            await worker.start(0)
        options = {**FAST_HEALTH, **overrides}
        config = RouterConfig(host="127.0.0.1", port=0, grpc_port=0, log_level="warning",
                              decode=tuple(f"{w.worker_id}={w.address}" for w in decodes),
                              prefill=tuple(f"{w.worker_id}={w.address}" for w in prefills), **options)
        app = RouterApp(config)
        await app.start()
        cluster = Cluster(app, decodes, prefills, tokenizer)
        started.append(cluster)
        if wait_ready:
            await wait_until(app.registry.ready)
        return cluster

    yield make
    for cluster in started:
        await cluster.app.stop(grace=0)
        for worker in [*cluster.decodes, *cluster.prefills, *cluster.extra.get("encoders", [])]:
            await worker.stop()
