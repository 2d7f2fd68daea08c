"""How a worker's KV pages appear to the transfer layer when its engine is tensor-parallel,
shared by the sending (prefill) and receiving (decode) sides.

Rank 0 is the worker's only transfer endpoint; it registers one region per rank, each
that rank's whole KV cache (engine.Engine.kv_buffers: the followers' caches are shared
memory mapped into rank 0). At TP size 1 that is the one region "kv", exactly as
before. A receiver at TP size b reserves, for one remote prefill, one room per rank
over the same page ids, and its KVDestination carries b (`tp_size`); a sender writes
each receiving rank's pages (its KV heads, engine.parallel.layout) into that rank's
region under that rank's room. Region and room names say the size and the rank, so a
sender knows what page format each region wants, and a sender at another TP size
never confuses its own regions with the ones it stages for a peer.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.engine import Engine
from engine.parallel.layout import TPLayout

KV_REGION = "kv"


def region_name(rank: int, tp_size: int, base: str = KV_REGION) -> str:
    """Rank `rank`'s region of a worker at TP size `tp_size` ("kv" at size 1)."""
    return base if tp_size == 1 else f"{base}.tp{tp_size}.{rank}"


def room_name(room_id: str, rank: int, tp_size: int) -> str:
    """Rank `rank`'s room of one transfer to a worker at TP size `tp_size` (the room itself at size 1)."""
    return room_id if tp_size == 1 else f"{room_id}.{rank}"


@dataclass(frozen=True)
class KVTarget:
    """One receiving rank of a transfer: where its pages go and under which room."""

    rank: int
    region: str
    room_id: str


def targets(room_id: str, tp_size: int, base: str = KV_REGION) -> list[KVTarget]:
    return [KVTarget(rank, region_name(rank, tp_size, base), room_name(room_id, rank, tp_size))
            for rank in range(tp_size)]


def page_bytes(config: ModelConfig, layout: TPLayout, page_size: int) -> int:
    """Bytes of one page of one rank's cache (every layer, K and V, its KV heads)."""
    itemsize = torch.empty(0, dtype=config.torch_dtype).element_size()
    return config.num_layers * 2 * page_size * layout.kv_heads_per_rank * config.head_dim * itemsize


def kv_regions(engine: Engine) -> Iterator[tuple[str, torch.Tensor]]:
    """(region name, tensor) of every rank's KV cache, to register with the backend."""
    size = engine.config.tensor_parallel_size
    for rank, buffer in enumerate(engine.kv_buffers()):
        yield region_name(rank, size), buffer
