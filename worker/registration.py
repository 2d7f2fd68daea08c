"""A worker's registration with a router: register, heartbeat, register again when the
router forgot it, deregister when leaving. Torch-free (stub workers of the router
benchmark use it too)."""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto.auth import cluster_channel
from worker.auth import router_credentials
from worker.config import WorkerConfig

logger = logging.getLogger(__name__)


async def register_loop(router: str, role: str, worker_id: str, address: str, interval_s: float,
                        config: WorkerConfig | None = None) -> None:
    """Register with the router and keep heartbeating; registers again whenever the
    router no longer knows this worker (it restarted or forgot it). Runs until cancelled.
    `config` gives the cluster token and the router's CA, when there are."""
    token, credentials = (config.cluster_token, router_credentials(config.router_ca)) if config else (None, None)
    async with cluster_channel(router, (), token, credentials) as channel:
        registry = pb_grpc.RegistryStub(channel)
        known = False
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                if not known:
                    await registry.Register(pb.RegisterRequest(role=role, id=worker_id, address=address),
                                            timeout=2.0)
                known = (await registry.Heartbeat(pb.HeartbeatRequest(id=worker_id), timeout=2.0)).known
            await asyncio.sleep(interval_s)


async def deregister(router: str, worker_id: str, config: WorkerConfig) -> None:
    """Tell the router this worker is leaving (best effort: the router also notices)."""
    credentials = router_credentials(config.router_ca)
    try:
        async with cluster_channel(router, (), config.cluster_token, credentials) as channel:
            await pb_grpc.RegistryStub(channel).Deregister(pb.DeregisterRequest(id=worker_id), timeout=2.0)
    except (grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
        logger.info("worker %s: deregistering failed (%s); the router will notice", worker_id, exc)
