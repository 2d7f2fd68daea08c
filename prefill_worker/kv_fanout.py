"""Where a prefill's KV pages go when either side is tensor-parallel (worker/kv_layout.py).

A destination at this worker's own TP size gets each rank's pages from that rank's region
as they are (at size 1 on both sides: the one region "kv", as always). A destination at
another size b gets them through a staging area of b regions, each in a receiving rank's
page format (its KV heads), filled from this worker's ranks by one strided copy per pair
of (sending rank, receiving rank) whose KV heads overlap, then written out as page runs.
The staging area has `slots` pages per region and is shared by every destination of
that size, one write round at a time (its lock); a prompt with more pages than slots to
send at once goes in several rounds.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from engine.engine import Engine
from engine.errors import ConfigError, InvalidRequestError
from engine.parallel.layout import TPLayout
from kv_transfer import EndpointDescriptor, TransferBackend
from worker.kv_layout import KV_REGION, KVTarget, page_bytes, region_name, targets

HeadCopy = tuple[int, slice, slice]  # (sending rank, its cache's head slice, the staged page's)


class KVStage:
    """Pages of this worker, re-cut for the ranks of a worker at another TP size."""

    def __init__(self, engine: Engine, dst: TPLayout, slots: int) -> None:
        self.sources = engine.kv_buffers()
        src = engine.tp_layout
        shape = self.sources[0].shape
        self.slots = slots
        self.buffers = [torch.zeros((slots, *shape[1:4], dst.kv_heads_per_rank, shape[5]), dtype=self.sources[0].dtype)
                        for _ in range(dst.size)]
        self.copies = [_head_copies(src, dst.kv_heads(rank)) for rank in range(dst.size)]
        self.lock = asyncio.Lock()  # one write round at a time uses the slots

    def fill(self, pages: list[int]) -> None:
        """Stage `pages` (this worker's page ids) in slots 0..len(pages)-1 of every region."""
        index = torch.tensor(pages, dtype=torch.long)
        count = len(pages)
        for buffer, copies in zip(self.buffers, self.copies):
            for rank, src_heads, dst_heads in copies:
                buffer[:count, :, :, :, dst_heads] = self.sources[rank][index, :, :, :, src_heads]


def _head_copies(src: TPLayout, heads: range) -> list[HeadCopy]:
    """Copies that assemble KV heads `heads` from the sending ranks (each head from the
    first rank holding it), merged where neighbouring heads come from one rank."""
    copies: list[HeadCopy] = []
    for head in heads:
        rank = src.kv_owner(head)
        local, staged = head - src.kv_heads(rank).start, head - heads.start
        if copies and copies[-1][0] == rank and copies[-1][1].stop == local:
            last = copies[-1]
            copies[-1] = (rank, slice(last[1].start, local + 1), slice(last[2].start, staged + 1))
        else:
            copies.append((rank, slice(local, local + 1), slice(staged, staged + 1)))
    return copies


@dataclass(frozen=True)
class Fanout:
    """Every receiving rank of one destination, and the stage its pages pass through
    (None: this worker's own regions, the destination being at its TP size)."""

    targets: list[KVTarget]
    stage: KVStage | None


class FanoutPlanner:
    """The fan-out of each destination; stages are made (and their regions registered)
    the first time a destination of their TP size comes."""

    def __init__(self, engine: Engine, transfer: TransferBackend) -> None:
        self.engine, self.transfer = engine, transfer
        self.stages: dict[int, asyncio.Future[KVStage]] = {}  # one per TP size, shared once made
        self.slots = -(-engine.config.max_num_batched_tokens // engine.config.page_size) + 1

    async def plan(self, room_id: str, region: str, tp_size: int, descriptor: EndpointDescriptor) -> Fanout:
        """InvalidRequestError when the destination's TP size cannot split this model,
        or its regions are not what that size needs."""
        size = tp_size or 1
        try:
            layout = TPLayout.of(self.engine.model_config, size)
        except ConfigError as exc:
            raise InvalidRequestError(f"destination tensor-parallel size: {exc}") from exc
        base = region or KV_REGION
        fanout = targets(room_id, size, base)
        expected = page_bytes(self.engine.model_config, layout, self.engine.config.page_size)
        for target in fanout:
            try:
                spec = descriptor.region(target.region)
            except KeyError:
                raise InvalidRequestError(f"destination {descriptor.address} has no region {target.region!r} "
                                          f"(it says its tensor-parallel size is {size})") from None
            if spec.page_bytes != expected:
                raise InvalidRequestError(f"destination region {target.region!r} has {spec.page_bytes}-byte pages; "
                                          f"tensor-parallel size {size} of this model needs {expected}")
        if size == self.engine.config.tensor_parallel_size:
            return Fanout(fanout, None)
        return Fanout(fanout, await self._stage(size, layout, base))

    async def _stage(self, size: int, layout: TPLayout, base: str) -> KVStage:
        made = self.stages.get(size)
        if made is None:  # concurrent first destinations of one size wait for the same stage
            made = self.stages[size] = asyncio.ensure_future(self._make_stage(size, layout, base))
        try:
            return await asyncio.shield(made)
        except Exception:
            if self.stages.get(size) is made:
                del self.stages[size]
            raise

    async def _make_stage(self, size: int, layout: TPLayout, base: str) -> KVStage:
        stage = KVStage(self.engine, layout, self.slots)
        for rank, buffer in enumerate(stage.buffers):
            await self.transfer.register_region(region_name(rank, size, base), buffer)
        return stage
