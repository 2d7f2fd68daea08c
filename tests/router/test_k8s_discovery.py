"""Kubernetes discovery against the fake API server (real HTTP, list + watch with
resourceVersions, bookmarks and 410 Gone): the registry follows pods' readiness."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from router.config import RouterConfig, parse_config
from router.k8s_discovery import (ApiAccess, DiscoverySettings, KubernetesDiscovery, PoolSelector,
                                  discovery_from_config, parse_pool_selector, pod_endpoint)
from router.registry import WorkerRegistry
from tests.router.fake_kube import FakeKube, make_pod

DECODE = {"app": "epd", "pool": "decode"}
PREFILL = {"app": "epd", "pool": "prefill"}
POOLS = [PoolSelector("decode", "app=epd,pool=decode"), PoolSelector("prefill", "app=epd,pool=prefill")]


@pytest.fixture
def kube() -> AsyncIterator[FakeKube]:
    server = FakeKube(bookmark_interval_s=0.2).start()
    yield server
    server.stop()


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time limit"
        await asyncio.sleep(0.02)


def workers(registry: WorkerRegistry) -> dict[str, tuple[str, str]]:
    return {h.state.id: (h.state.role, h.state.address) for h in registry.handles()}


async def started(kube: FakeKube, registry: WorkerRegistry, watch_timeout_s: float = 30.0,
                  access: ApiAccess | None = None) -> KubernetesDiscovery:
    settings = DiscoverySettings(namespace="test", watch_timeout_s=watch_timeout_s, request_timeout_s=2.0)
    discovery = KubernetesDiscovery(registry, access or ApiAccess(kube.url), POOLS, settings)
    discovery.start()
    return discovery


async def test_registry_follows_pod_readiness(kube: FakeKube) -> None:
    registry = WorkerRegistry(RouterConfig(decode=("static=127.0.0.1:1",)))
    kube.put_pod(make_pod("decode-a", DECODE, "127.0.0.1", 5001))
    kube.put_pod(make_pod("other", {"app": "else"}, "127.0.0.1", 5009, ready=True))
    discovery = await started(kube, registry)
    try:
        await eventually(lambda: kube.requests.watches != [])
        assert workers(registry) == {"static": ("decode", "127.0.0.1:1")}  # not Ready: no traffic
        kube.set_ready("decode-a", True)
        kube.put_pod(make_pod("prefill-a", PREFILL, "127.0.0.2", 5002, ready=True))
        await eventually(lambda: set(workers(registry)) == {"static", "decode-a", "prefill-a"})
        assert workers(registry)["prefill-a"] == ("prefill", "127.0.0.2:5002")
        kube.set_ready("decode-a", False)
        await eventually(lambda: "decode-a" not in workers(registry))
        kube.set_ready("decode-a", True)
        await eventually(lambda: "decode-a" in workers(registry))
        kube.put_pod(make_pod("decode-a", DECODE, "127.0.0.3", 5003, ready=True))  # same name, new pod
        await eventually(lambda: workers(registry).get("decode-a") == ("decode", "127.0.0.3:5003"))
        kube.delete_pod("decode-a")
        kube.delete_pod("prefill-a")
        await eventually(lambda: set(workers(registry)) == {"static"})
    finally:
        await discovery.stop()
        await registry.close()


async def test_gone_version_lists_again_and_keeps_following(kube: FakeKube) -> None:
    registry = WorkerRegistry(RouterConfig())
    kube.put_pod(make_pod("decode-a", DECODE, "127.0.0.1", 5001, ready=True))
    discovery = await started(kube, registry)
    try:
        await eventually(lambda: "decode-a" in workers(registry))
        lists = kube.requests.lists
        kube.compact()
        kube.put_pod(make_pod("decode-b", DECODE, "127.0.0.1", 5002, ready=True))
        await eventually(lambda: "decode-b" in workers(registry))
        assert kube.requests.lists > lists  # 410 Gone: a fresh list, not a silent gap
        kube.delete_pod("decode-a")
        await eventually(lambda: set(workers(registry)) == {"decode-b"})
    finally:
        await discovery.stop()
        await registry.close()


async def test_watch_resumes_from_bookmarks(kube: FakeKube) -> None:
    registry = WorkerRegistry(RouterConfig())
    discovery = await started(kube, registry, watch_timeout_s=1.0)
    try:
        await eventually(lambda: len(kube.requests.watches) >= 2)
        listed = int(kube.requests.watches[0])
        for index in range(3):  # changes in the decode pool move the version on
            kube.put_pod(make_pod(f"decode-{index}", DECODE, "127.0.0.1", 5100 + index, ready=True))
        await eventually(lambda: len(workers(registry)) == 3)
        seen = len(kube.requests.watches)
        await eventually(lambda: len(kube.requests.watches) >= seen + 2, timeout_s=6.0)
        prefill_watch = discovery.watches[1]
        assert int(str(prefill_watch.resource_version)) > listed + 2  # from bookmarks: no event of its own
        assert kube.requests.lists == 2  # one per pool: resumed watches never re-list
    finally:
        await discovery.stop()
        await registry.close()


async def test_unreachable_api_server_is_retried(kube: FakeKube, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("secret-token\n")
    registry = WorkerRegistry(RouterConfig())
    dead = ApiAccess("http://127.0.0.1:1", tmp_path / "token")
    discovery = await started(kube, registry, access=dead)
    await asyncio.sleep(0.3)
    await discovery.stop()  # retrying with backoff, and stoppable
    kube.put_pod(make_pod("decode-a", DECODE, "127.0.0.1", 5001, ready=True))
    discovery = await started(kube, registry, access=ApiAccess.resolve(kube.url, sa_dir=tmp_path))
    try:
        await eventually(lambda: "decode-a" in workers(registry))
        assert "Bearer secret-token" in kube.requests.token
    finally:
        await discovery.stop()
        await registry.close()


def test_pod_endpoint_readiness_rules() -> None:
    pod = make_pod("p", DECODE, "10.0.0.5", 7000, ready=True)
    assert pod_endpoint(pod, "grpc").ready and pod_endpoint(pod, "grpc").address == "10.0.0.5:7000"
    assert pod_endpoint(pod, "other").address is None and not pod_endpoint(pod, "other").ready
    terminating = make_pod("p", DECODE, "10.0.0.5", 7000, ready=True)
    terminating["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    assert not pod_endpoint(terminating, "grpc").ready
    pending = make_pod("p", DECODE, "fd00::5", 7000, ready=True)
    pending["status"]["phase"] = "Pending"
    assert pod_endpoint(pending, "grpc").address == "[fd00::5]:7000" and not pod_endpoint(pending, "grpc").ready


def test_selector_flags_and_in_cluster_access(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = parse_config(["--k8s-selector", "decode=app=epd,pool=decode", "--k8s-selector", "prefill=pool=p",
                           "--k8s-namespace", "ns", "--k8s-removal-grace", "5"])
    assert config.k8s_selector == ("decode=app=epd,pool=decode", "prefill=pool=p")
    assert parse_pool_selector(config.k8s_selector[0]) == PoolSelector("decode", "app=epd,pool=decode")
    for bad in ("app=epd", "router=app=x", "decode="):
        with pytest.raises(ValueError, match="ROLE=LABEL_SELECTOR"):
            parse_config(["--k8s-selector", bad])
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ValueError, match="--k8s-api-server"):
        discovery_from_config(config, WorkerRegistry(RouterConfig()))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    assert ApiAccess.resolve(None, sa_dir=tmp_path) == ApiAccess("https://10.96.0.1:6443")
    assert discovery_from_config(RouterConfig(), WorkerRegistry(RouterConfig())) is None
