"""Prefixes pinned through the router's admin API, on every prefill and decode worker.

A pin (a system prompt, tool definitions) is fanned out as PinPrefix to every healthy
prefill and decode worker: each pins the prefix's full pages in its own prefix cache,
those cached now at once and the others when a request computes them, and never evicts
them while pinned (capped per worker, `--max-pinned-fraction`). Every session that starts
with the prefix shares those pages. The router remembers its pins: a worker that joins
later, or restarted and lost them, reports pins (`WorkerStatus.pins`, the last page
hash of each) without one of them, and `sync` sends it again.

Owned by the router's event loop. A pin no worker accepted (over every cap) is refused
(409) and not remembered; one that only some workers took is remembered, and the others
are retried by `sync` (after their cap was raised or other pins dropped). A pin's id is
a hash of its tokens, the same on every router; unpinning by id also removes the same
prefix pinned by requests' own `pin_prefix` (pin it here first to learn its id).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from engine.radix_cache import page_hashes
from proto import epd_pb2
from router.config import RouterConfig
from router.errors import InvalidRequest, PinNotFound, PinRefused
from router.registry import WorkerHandle, WorkerRegistry

log = logging.getLogger("router.pins")
POOLS = ("prefill", "decode")
RETRY_AFTER_S = 30.0  # a worker that refused a re-pin (over its cap) is asked again after this


@dataclass(frozen=True)
class WorkerPinResult:
    worker: str
    role: str
    ok: bool
    pages_added: int = 0
    pinned_pages: int = 0
    resident_pages: int = 0
    error: str = ""
    code: str = ""


class PinManager:
    def __init__(self, registry: WorkerRegistry, config: RouterConfig) -> None:
        self.registry = registry
        self.config = config
        self._pins: dict[str, tuple[tuple[int, ...], float]] = {}  # id -> (token ids, when pinned)
        self._retry_at: dict[tuple[str, str], float] = {}  # (worker, pin id) refused -> next try (monotonic)
        self._task: asyncio.Task[None] | None = None

    # -- the admin calls -------------------------------------------------------------

    async def pin(self, tokens: list[int]) -> dict[str, Any]:
        results = await self._fan_out("PinPrefix", tokens)
        if results and not any(r.ok for r in results):
            if all(r.code == "INVALID_ARGUMENT" for r in results):
                raise InvalidRequest(f"no worker could pin the prefix: {results[0].error}", param="prompt")
            raise PinRefused("no worker could pin the prefix: " + "; ".join(
                f"{r.worker}: {r.error}" for r in results))
        self._pins.setdefault(pin_id(tokens), (tuple(tokens), time.time()))
        return _summary(tokens, results)

    async def unpin(self, pin: str) -> dict[str, Any]:
        entry = self._pins.pop(pin, None)
        self._retry_at = {key: at for key, at in self._retry_at.items() if key[1] != pin}
        if entry is None:
            raise PinNotFound(f"no pin {pin!r} on this router (GET /admin/pins lists them)", param="pin_id")
        results = await self._fan_out("UnpinPrefix", list(entry[0]))
        return {**_summary(list(entry[0]), results), "deleted": True}

    def describe(self) -> dict[str, Any]:
        """The pins, and for each the workers that report holding it."""
        out = []
        for pin, (tokens, pinned_at) in self._pins.items():
            holders = [h.state.id for h in self._targets() if self._holds(h, tokens)]
            out.append({"id": pin, "object": "pin", "tokens": len(tokens), "pinned_at": pinned_at,
                        "workers": holders})
        return {"object": "list", "data": out}

    async def _fan_out(self, method: str, tokens: list[int]) -> list[WorkerPinResult]:
        targets = self._targets()
        return list(await asyncio.gather(*(self._call(h, method, tokens) for h in targets)))

    async def _call(self, handle: WorkerHandle, method: str, tokens: list[int]) -> WorkerPinResult:
        state = handle.state
        try:
            reply = await getattr(handle.stub, method)(epd_pb2.PinPrefixRequest(token_ids=tokens),
                                                       timeout=self.config.health_timeout * 5)
        except grpc.aio.AioRpcError as exc:
            return WorkerPinResult(state.id, state.role, False, error=exc.details() or exc.code().name,
                                   code=exc.code().name)
        ok = method == "PinPrefix" or reply.found
        return WorkerPinResult(state.id, state.role, ok, reply.pages_added, reply.pinned_pages, reply.resident_pages)

    def _targets(self) -> list[WorkerHandle]:
        states = [s for pool in POOLS for s in self.registry.healthy(pool)]
        return [h for h in (self.registry.get(s.id) for s in states) if h is not None]

    # -- keeping workers in line -------------------------------------------------------

    @staticmethod
    def _holds(handle: WorkerHandle, tokens: tuple[int, ...]) -> bool | None:
        """Whether the worker's last Status lists the pin (None: it cannot say yet)."""
        status = handle.state.status
        if status is None or status.page_size <= 0:
            return None
        hashes = page_hashes(list(tokens), status.page_size)
        return not hashes or hashes[-1] in set(status.pins)

    async def sync(self) -> int:
        """Pin again on every healthy worker whose Status lacks a remembered pin;
        returns the pins sent."""
        now = time.monotonic()
        sends = [(h, pin, tokens) for h in self._targets() for pin, (tokens, _) in self._pins.items()
                 if self._holds(h, tokens) is False and self._retry_at.get((h.state.id, pin), 0.0) <= now]
        results = await asyncio.gather(*(self._call(h, "PinPrefix", list(t)) for h, _, t in sends))
        for (_, pin, _), result in zip(sends, results):
            if result.ok:
                self._retry_at.pop((result.worker, pin), None)
                log.info("re-pinned %s on %s %s (its status lacked it)", pin, result.role, result.worker)
            else:
                self._retry_at[(result.worker, pin)] = now + RETRY_AFTER_S
                log.warning("re-pinning %s on %s failed (next try in %g s): %s", pin, result.worker,
                            RETRY_AFTER_S, result.error)
        return len(sends)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="router-pins")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(max(self.config.health_interval, 0.1) * 2)
            if self._pins:
                try:
                    await self.sync()
                except Exception:  # noqa: BLE001 - keep syncing whatever one round hit
                    log.exception("pin sync failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def pin_id(tokens: list[int] | tuple[int, ...]) -> str:
    digest = hashlib.blake2b(b"".join(t.to_bytes(4, "little") for t in tokens), digest_size=8)
    return f"pin-{digest.hexdigest()}"


def _summary(tokens: list[int], results: list[WorkerPinResult]) -> dict[str, Any]:
    return {"id": pin_id(tokens), "object": "pin", "tokens": len(tokens),
            "workers": [{k: v for k, v in vars(r).items() if k != "code"} for r in results]}
