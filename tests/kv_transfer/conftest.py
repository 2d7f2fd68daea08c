"""Fixtures of the kv_transfer suite: one parametrized backend factory, endpoint
pairs, and separate-process peers that are always reaped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.kv_transfer.support import (NUM_PAGES, BackendFactory, Pair, PeerProcess,
                                       factory_for, open_endpoint, random_kv,
                                       spawn_peer, suite_params)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "large_transfer: moves >= 256 MiB; runs in CI (~1-2 s, ~1 GiB RAM)")


@pytest.fixture(params=suite_params())
def factory(request: pytest.FixtureRequest) -> BackendFactory:
    return factory_for(request.param)


@pytest.fixture
async def pair(factory: BackendFactory) -> AsyncIterator[Pair]:
    src = random_kv(NUM_PAGES, seed=1, device=factory.device)
    dst = random_kv(NUM_PAGES, seed=2, device=factory.device)
    sender = await open_endpoint(factory, src)
    receiver = await open_endpoint(factory, dst)
    try:
        peer = await sender.connect(receiver.descriptor(), timeout=5)
        yield Pair(sender, receiver, src, dst, peer)
    finally:
        await sender.close()
        await receiver.close()


@pytest.fixture
async def peer_processes() -> AsyncIterator[
        Callable[..., Awaitable[PeerProcess]]]:
    """Spawns receiver processes; kills whatever is left at teardown."""
    spawned: list[PeerProcess] = []

    async def spawn(factory: BackendFactory, num_pages: int,
                    extra_config: dict[str, Any] | None = None) -> PeerProcess:
        peer = await spawn_peer(factory, num_pages, extra_config)
        spawned.append(peer)
        return peer

    yield spawn
    for peer in spawned:
        await peer.kill()
