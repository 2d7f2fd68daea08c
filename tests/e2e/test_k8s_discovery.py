"""A router that discovers its workers through the (fake) Kubernetes API, with real worker
processes on the tiny model behind the fake pods: as pods appear, become Ready, lose
readiness and disappear, `/cluster` follows within 5 s, and requests under load are not
dropped."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from tests.router.fake_kube import FakeKube, make_pod
from worker.config import free_port

pytestmark = pytest.mark.slow
FOLLOW_S = 5.0  # what the issue asks of /cluster


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "deploy.cli", *args], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115


def worker_serving(role: str, address: str) -> bool:
    """What the kubelet's readiness probe stands for here: the worker answers Status."""
    stub = pb_grpc.PrefillWorkerStub if role == "prefill" else pb_grpc.DecodeWorkerStub

    async def status() -> bool:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                await stub(channel).Status(pb.StatusRequest(), timeout=1.0)
                return True
            except grpc.aio.AioRpcError:
                return False
    return asyncio.run(status())


@dataclass
class Cluster:
    kube: FakeKube
    http: str
    ports: dict[str, int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ids(self) -> set[str]:
        body = httpx.get(f"{self.http}/cluster", timeout=5.0).json()
        return {entry["id"] for entry in body if entry["healthy"]}

    def follows(self, expected: set[str]) -> float:
        start = time.monotonic()
        while self.ids() != expected:
            assert time.monotonic() - start < FOLLOW_S, f"/cluster {self.ids()} != {expected} after {FOLLOW_S} s"
            time.sleep(0.1)
        return time.monotonic() - start


def labels(role: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "epd-serve", "app.kubernetes.io/component": role}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    kube = FakeKube(bookmark_interval_s=1.0).start()
    ports = {name: free_port() for name in ("prefill-0", "decode-0", "decode-1")}
    c = Cluster(kube, "", ports)
    try:
        for name, port in ports.items():
            role = name.split("-")[0]
            kube.put_pod(make_pod(name, labels(role), "127.0.0.1", port))  # scheduled, not Ready yet
            c.processes.append(spawn(["worker", role, "--port", str(port), "--worker-id", name,
                                      "--num-pages", "256"], tmp_path / f"{name}.log"))
        http_port = free_port()
        c.http = f"http://127.0.0.1:{http_port}"
        c.processes.append(spawn([
            "router", "--port", str(http_port), "--grpc-port", str(free_port()), "--expect-decode", "0",
            "--k8s-api-server", kube.url, "--k8s-namespace", "test", "--k8s-watch-timeout", "2",
            "--k8s-selector", "prefill=app.kubernetes.io/name=epd-serve,app.kubernetes.io/component=prefill",
            "--k8s-selector", "decode=app.kubernetes.io/name=epd-serve,app.kubernetes.io/component=decode",
            "--health-interval", "0.2"], tmp_path / "router.log"))
        yield c
    finally:
        for proc in c.processes:
            proc.terminate()
        for proc in c.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        kube.stop()


def wait_started(c: Cluster, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(c.ports)
    while pending:
        assert time.monotonic() < deadline, f"workers {pending} did not start"
        assert all(p.poll() is None for p in c.processes), "a process exited during start-up"
        for name in list(pending):
            if worker_serving(name.split("-")[0], f"127.0.0.1:{c.ports[name]}"):
                pending.discard(name)
        time.sleep(0.3)
    while True:
        try:
            httpx.get(f"{c.http}/cluster", timeout=2.0)
            return
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "router did not start"
            time.sleep(0.3)


@dataclass
class Load:
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    stop: bool = False


async def send_load(http: str, load: Load, concurrency: int = 4, max_requests: int = 400,
                    max_s: float = 90.0) -> None:
    """Bounded in count and time; each request runs long enough to be in flight."""
    deadline = time.monotonic() + max_s
    body = {"model": "tiny-llama", "prompt": "x" * 80, "max_tokens": 48, "temperature": 0}

    async def one_client(client: httpx.AsyncClient) -> None:
        while not load.stop and time.monotonic() < deadline and load.ok + len(load.failed) < max_requests:
            try:
                response = await client.post(f"{http}/v1/completions", json=body, timeout=60.0)
                if response.status_code == 200 and response.json()["choices"][0]["text"] is not None:
                    load.ok += 1
                else:
                    load.failed.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as exc:
                load.failed.append(repr(exc))

    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(one_client(client) for _ in range(concurrency)))


def test_cluster_follows_pods_under_load(cluster: Cluster) -> None:
    c = cluster
    wait_started(c)
    assert c.ids() == set()  # running, but no pod is Ready: no traffic
    for name in c.ports:
        c.kube.set_ready(name, True)
    c.follows({"prefill-0", "decode-0", "decode-1"})
    load = Load()

    async def scenario() -> None:
        sender = asyncio.create_task(send_load(c.http, load))

        async def step(action: object, expected: set[str]) -> None:
            done = load.ok
            await asyncio.to_thread(c.follows, expected)
            await asyncio.sleep(1.5)  # requests keep completing meanwhile
            assert load.ok > done, f"no request completed after {action}"

        await asyncio.sleep(1.0)
        c.kube.set_ready("decode-1", False)
        await step("decode-1 unready", {"prefill-0", "decode-0"})
        c.kube.set_ready("decode-1", True)
        await step("decode-1 ready", {"prefill-0", "decode-0", "decode-1"})
        c.kube.delete_pod("decode-1")
        await step("decode-1 deleted", {"prefill-0", "decode-0"})
        c.kube.put_pod(make_pod("decode-1", labels("decode"), "127.0.0.1", c.ports["decode-1"], ready=True))
        await step("decode-1 back", {"prefill-0", "decode-0", "decode-1"})
        c.kube.compact()  # 410 Gone for the router's watches: it lists again
        c.kube.delete_pod("decode-1")
        await step("decode-1 deleted after compaction", {"prefill-0", "decode-0"})
        load.stop = True
        await sender

    asyncio.run(scenario())
    assert load.failed == [], load.failed[:5]
    assert load.ok >= 10
