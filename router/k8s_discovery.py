"""Worker discovery through the Kubernetes API: one list + watch of pods per pool (a label
selector per role), following each pod's readiness into the router's WorkerRegistry.

A pod is in the registry while it is Ready, Running, has an IP and is not being deleted;
it is added as worker `<pod name>` at `<pod IP>:<its container port named --k8s-port-name>`
and removed as soon as any of that stops being true (the health monitor then decides,
as for every worker, when it takes traffic). Removal lets calls already running on the
pod finish for `removal_grace_s` (a draining pod turns unready first), while no new
request is routed there.

The watch follows the API's protocol: list (a consistent snapshot and its
resourceVersion), then watch from that version with bookmarks; a watch that ends is
resumed from the last version seen (bookmarks keep it fresh); `410 Gone` (the version was
compacted away) means list again. Every network wait has a timeout; a lost API server
keeps the last known pods (their Status polls still judge their health) and is retried
with a capped backoff. Input is parsed as JSON only.

Only workers this module added are ever removed by it: workers named on the command line
and workers that register themselves are left alone.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from router.config import ROLES, RouterConfig

log = logging.getLogger("router.k8s")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_MAX_BACKOFF_S = 5.0


@dataclass(frozen=True)
class PoolSelector:
    """`ROLE=SELECTOR` from `--k8s-selector`, e.g. `decode=app.kubernetes.io/component=decode`."""

    role: str
    selector: str


def parse_pool_selector(spec: str) -> PoolSelector:
    role, sep, selector = spec.partition("=")
    if not sep or role not in ROLES or not selector.strip():
        raise ValueError(f"--k8s-selector {spec!r}: expected ROLE=LABEL_SELECTOR with ROLE one of {ROLES}")
    return PoolSelector(role, selector.strip())


@dataclass(frozen=True)
class ApiAccess:
    """Where the API server is and how to authenticate to it."""

    server: str
    token_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def resolve(cls, server: str | None, sa_dir: Path = SERVICE_ACCOUNT_DIR) -> ApiAccess:
        """An explicit URL, else the in-cluster service (KUBERNETES_SERVICE_HOST/PORT).
        The service account's token and CA are used when they exist."""
        token = sa_dir / "token" if (sa_dir / "token").is_file() else None
        ca = sa_dir / "ca.crt" if (sa_dir / "ca.crt").is_file() else None
        if server:
            return cls(server.rstrip("/"), token, ca)
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if not host:
            raise ValueError("--k8s-selector needs --k8s-api-server outside a Kubernetes pod "
                             "(KUBERNETES_SERVICE_HOST is not set)")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", token, ca)

    def headers(self) -> dict[str, str]:
        """Read the token on every request: projected tokens are rotated on disk."""
        if self.token_file is None:
            return {}
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}

    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True


def default_namespace(sa_dir: Path = SERVICE_ACCOUNT_DIR) -> str:
    path = sa_dir / "namespace"
    return path.read_text().strip() if path.is_file() else "default"


@dataclass(frozen=True)
class DiscoverySettings:
    namespace: str
    port_name: str = "grpc"          # container port that carries the worker's gRPC port
    watch_timeout_s: float = 60.0    # asked of the server (timeoutSeconds) per watch call
    request_timeout_s: float = 10.0  # connect, list, and the margin on a watch's reads
    removal_grace_s: float = 30.0    # calls running on a pod that left may finish this long


@dataclass(frozen=True)
class PodEndpoint:
    """What the router needs of one pod: its worker address once it can take traffic."""

    name: str
    address: str | None  # None while the pod has no IP or no port named port_name
    ready: bool


def pod_endpoint(pod: Mapping[str, Any], port_name: str) -> PodEndpoint:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    conditions = status.get("conditions") or []
    ready_condition = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    ip, port = status.get("podIP"), _container_port(pod, port_name)
    address = None
    if ip and port is not None:
        address = f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"
    ready = (ready_condition and status.get("phase") == "Running" and address is not None
             and not meta.get("deletionTimestamp"))
    return PodEndpoint(str(meta.get("name", "")), address, ready)


def _container_port(pod: Mapping[str, Any], port_name: str) -> int | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == port_name and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return None


class GoneError(Exception):
    """The resourceVersion a watch started from is no longer available: list again."""


OnChange = Callable[[str, dict[str, PodEndpoint]], None]


class PodWatch:
    """Keeps `pods` (name -> PodEndpoint) of one pool current; calls `on_change(role, pods)`
    after every list and every event that changed them."""

    def __init__(self, access: ApiAccess, pool: PoolSelector, settings: DiscoverySettings,
                 on_change: OnChange) -> None:
        self._access = access
        self._pool = pool
        self._settings = settings
        self._on_change = on_change
        self._url = f"{access.server}/api/v1/namespaces/{settings.namespace}/pods"
        self.pods: dict[str, PodEndpoint] = {}
        self.resource_version: str | None = None  # None: list before watching

    async def run(self) -> None:
        """Until cancelled: list, then watch from the last version; back off on errors."""
        backoff = 0.5
        async with httpx.AsyncClient(verify=self._access.verify(), trust_env=False) as client:
            while True:
                try:
                    if self.resource_version is None:
                        await self._list(client)
                    backoff = 0.5
                    await self._watch(client)
                except GoneError:
                    log.info("%s pods: resourceVersion %s is gone; listing again", self._pool.role,
                             self.resource_version)
                    self.resource_version = None
                except (httpx.HTTPError, ValueError, KeyError, TypeError, OSError) as exc:
                    log.warning("%s pods: %s: %s (retrying in %.1f s)", self._pool.role,
                                type(exc).__name__, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _params(self, **extra: str) -> dict[str, str]:
        return {"labelSelector": self._pool.selector, **extra}

    async def _list(self, client: httpx.AsyncClient) -> None:
        response = await client.get(self._url, params=self._params(), headers=self._access.headers(),
                                    timeout=self._settings.request_timeout_s)
        response.raise_for_status()
        body = response.json()
        pods = [pod_endpoint(item, self._settings.port_name) for item in body.get("items") or []]
        self.pods = {pod.name: pod for pod in pods}
        self.resource_version = str(body["metadata"]["resourceVersion"])
        self._on_change(self._pool.role, dict(self.pods))

    async def _watch(self, client: httpx.AsyncClient) -> None:
        """One watch call, until the server ends it (timeoutSeconds) or an error."""
        s = self._settings
        params = self._params(watch="true", allowWatchBookmarks="true",
                              resourceVersion=str(self.resource_version),
                              timeoutSeconds=str(max(1, int(s.watch_timeout_s))))
        timeout = httpx.Timeout(s.request_timeout_s, read=s.watch_timeout_s + s.request_timeout_s)
        async with client.stream("GET", self._url, params=params, headers=self._access.headers(),
                                 timeout=timeout) as response:
            if response.status_code == 410:
                raise GoneError()
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.strip():
                    self._apply_event(json.loads(line))

    def _apply_event(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise GoneError()
            raise ValueError(f"watch error: {obj.get('message') or obj}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)
        if kind == "BOOKMARK":
            return
        pod = pod_endpoint(obj, self._settings.port_name)
        if kind == "DELETED":
            changed = self.pods.pop(pod.name, None) is not None
        elif kind in ("ADDED", "MODIFIED"):
            changed = self.pods.get(pod.name) != pod
            self.pods[pod.name] = pod
        else:
            raise ValueError(f"unknown watch event type {kind!r}")
        if changed:
            self._on_change(self._pool.role, dict(self.pods))


class WorkerTarget(Protocol):
    """The registry calls discovery makes (the router's WorkerRegistry)."""

    def add(self, role: str, worker_id: str, address: str) -> object: ...

    def remove(self, worker_id: str, grace: float = 0.0) -> bool: ...


class KubernetesDiscovery:
    """One PodWatch per pool; the Ready pods of each pool are the registry's workers of
    that role that this discovery added (`owned`)."""

    def __init__(self, registry: WorkerTarget, access: ApiAccess, pools: list[PoolSelector],
                 settings: DiscoverySettings) -> None:
        self._registry = registry
        self._settings = settings
        self.watches = [PodWatch(access, pool, settings, self._apply) for pool in pools]
        self.owned: dict[str, dict[str, str]] = {pool.role: {} for pool in pools}  # role -> id -> address
        self._tasks: list[asyncio.Task[None]] = []

    def _apply(self, role: str, pods: dict[str, PodEndpoint]) -> None:
        wanted = {p.name: p.address for p in pods.values() if p.ready and p.address}
        owned = self.owned[role]
        for name, address in list(owned.items()):
            if wanted.get(name) != address:
                del owned[name]
                self._registry.remove(name, grace=self._settings.removal_grace_s)
                log.info("%s pod %s left (not ready or gone)", role, name)
        for name, address in wanted.items():
            if name not in owned:
                self._registry.add(role, name, str(address))
                owned[name] = str(address)
                log.info("%s pod %s is ready at %s", role, name, address)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(w.run(), name="router-k8s-watch") for w in self.watches]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []


def discovery_from_config(config: RouterConfig, registry: WorkerTarget) -> KubernetesDiscovery | None:
    """The discovery that `--k8s-selector` asks for, or None without one."""
    if not config.k8s_selector:
        return None
    settings = DiscoverySettings(namespace=config.k8s_namespace or default_namespace(),
                                 port_name=config.k8s_port_name, watch_timeout_s=config.k8s_watch_timeout,
                                 removal_grace_s=config.k8s_removal_grace)
    pools = [parse_pool_selector(spec) for spec in config.k8s_selector]
    return KubernetesDiscovery(registry, ApiAccess.resolve(config.k8s_api_server), pools, settings)
