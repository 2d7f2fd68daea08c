"""Admin routes (the admin key when one is set; see router/auth.py):

    GET  /admin/pools             every pool: replicas, ready, starting, draining, autoscale
                                  bounds, and the recent scaling decisions with their inputs
    POST /admin/pools/{pool}      {"replicas": N}: grow (through the launcher) or drain down
"""
from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request

from router.auth import require_admin
from router.errors import InvalidRequest
from router.openai_protocol import parse_body
from router.pools import PoolError, PoolManager
from router.service import RouterService


def add_admin_routes(app: FastAPI, service: RouterService) -> None:
    admin = [Depends(require_admin)]

    def pools() -> PoolManager:
        if service.pools is None:
            raise PoolError("pool management is not running on this router", 503)
        return service.pools

    @app.get("/admin/pools", dependencies=admin)
    async def list_pools() -> dict[str, Any]:
        return pools().describe()

    @app.post("/admin/pools/{pool}", dependencies=admin)
    async def scale_pool(pool: str, request: Request) -> dict[str, Any]:
        body = parse_body(await request.body())
        if not isinstance(body, dict) or set(body) - {"replicas"} or "replicas" not in body:
            raise InvalidRequest('the body must be {"replicas": N}')
        return await pools().scale(pool, body["replicas"])
