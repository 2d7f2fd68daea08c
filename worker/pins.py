"""Pinned prefixes on a worker (prefill and decode alike): the PinPrefix / UnpinPrefix
calls the router's admin endpoint fans out, and a request's own `pin_prefix_tokens`.

A pin marks the chained hashes of a prefix's full pages in the engine's radix cache:
pages cached now are pinned at once, the others as they land, and pinned pages are never
evicted (capped at `--max-pinned-fraction` of the pool). The admin call reports a pin
over the cap (RESOURCE_EXHAUSTED); a request's pin that does not fit is skipped (the
request is served, the refusal counted in `pin_refusals_total`), since a hint must never
fail a generation.
"""
from __future__ import annotations

import logging

import grpc

from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.radix_cache import PinError
from proto import epd_pb2 as pb
from worker.metrics import Sample

logger = logging.getLogger(__name__)


class Pins:
    """The pin calls of one worker; every engine touch runs on the engine thread."""

    def __init__(self, runtime) -> None:  # noqa: ANN001 - WorkerRuntime (imports this module)
        self.runtime = runtime
        self.refusals_total = 0

    @property
    def engine(self) -> Engine:
        return self.runtime.engine

    async def pin(self, request: pb.PinPrefixRequest, context: grpc.aio.ServicerContext) -> pb.PinPrefixResponse:
        try:
            added = await self.runtime.async_engine.run(self.engine.pin_prefix, list(request.token_ids))
        except PinError as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.over_cap else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(exc))
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return await self._response(pages_added=added)

    async def unpin(self, request: pb.PinPrefixRequest, context: grpc.aio.ServicerContext) -> pb.PinPrefixResponse:
        try:
            found = await self.runtime.async_engine.run(self.engine.unpin_prefix, list(request.token_ids))
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return await self._response(found=found)

    async def _response(self, **fields: object) -> pb.PinPrefixResponse:
        counts = await self.runtime.async_engine.run(pin_counts, self.engine)
        return pb.PinPrefixResponse(pinned_pages=counts["pinned_pages"],
                                    resident_pages=counts["pinned_pages_resident"], **fields)

    def apply(self, token_ids: list[int], count: int, request_id: str) -> None:
        """Engine thread: a request's pin of its first `count` tokens; never raises."""
        if count <= 0:
            return
        try:
            self.engine.pin_prefix(token_ids[:count])
        except (PinError, InvalidRequestError) as exc:
            self.refusals_total += 1
            logger.info("request %s: its prefix pin is skipped: %s", request_id, exc)

    def samples(self) -> list[Sample]:
        return [Sample("pin_refusals_total", float(self.refusals_total), counter=True)]


def pin_counts(engine: Engine) -> dict[str, int]:
    """Engine thread: the pinned pages, and those of them cached now."""
    cache = engine.scheduler.cache
    if cache is None:
        return {"pinned_pages": 0, "pinned_pages_resident": 0}
    return {"pinned_pages": cache.pinned_pages, "pinned_pages_resident": cache.resident_pinned_pages}


def check_pin_count(count: int, prompt_len: int) -> None:
    if count > prompt_len:
        raise InvalidRequestError(f"pin_prefix_tokens is {count}; the prompt has only {prompt_len} tokens")
