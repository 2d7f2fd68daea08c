"""Admin routes (the admin key when one is set; see router/auth.py):

    GET  /admin/pools             every pool: replicas, ready, starting, draining, autoscale
                                  bounds, and the recent scaling decisions with their inputs
    POST /admin/pools/{pool}      {"replicas": N}: grow (through the launcher) or drain down
    POST /admin/pins              {"prompt": TEXT | [ids]} or {"messages": [...]}: pin that
                                  prefix on every prefill and decode worker (router/pins.py)
    DELETE /admin/pins/{id}       unpin it everywhere (the id is in the POST's answer)
    GET  /admin/pins              the router's pins and the workers that hold each
"""
from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request

from router.auth import require_admin
from router.errors import InvalidRequest
from router.openai_protocol import ChatCompletionRequest, chat_messages, parse_body, validate_model
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

    @app.post("/admin/pins", dependencies=admin)
    async def pin(request: Request) -> dict[str, Any]:
        return await service.pins.pin(pin_tokens(service, await request.body()))

    @app.delete("/admin/pins/{pin_id}", dependencies=admin)
    async def unpin(pin_id: str) -> dict[str, Any]:
        return await service.pins.unpin(pin_id)

    @app.get("/admin/pins", dependencies=admin)
    async def list_pins() -> dict[str, Any]:
        return service.pins.describe()


def pin_tokens(service: RouterService, raw: bytes) -> list[int]:
    """The prefix a pin body names: `prompt` (text, tokenized as a completion prompt is,
    or token ids) or `messages` (chat messages as the template renders them, without a
    generation prompt: pin a conversation's leading system message this way)."""
    body = parse_body(raw)
    if len(set(body) & {"prompt", "messages"}) != 1 or set(body) - {"prompt", "messages"}:
        raise InvalidRequest('the body must be {"prompt": TEXT or [token ids]} or {"messages": [...]}')
    if "messages" in body:
        messages, images = chat_messages(validate_model(ChatCompletionRequest, {"messages": body["messages"]}))
        if images:
            raise InvalidRequest("a pinned prefix cannot hold images", param="messages")
        tokens = service.encode_chat(messages, add_generation_prompt=False)
    elif isinstance(body["prompt"], str) and body["prompt"]:
        tokens = service.encode_text(body["prompt"])
    elif isinstance(body["prompt"], list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                  for t in body["prompt"]):
        tokens = list(body["prompt"])
    else:
        raise InvalidRequest("prompt must be a non-empty string or a list of token ids", param="prompt")
    service.check_prompt(tokens)
    return tokens
