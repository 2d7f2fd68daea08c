"""Re-cutting KV pages for a worker of another TP size: every receiving rank's staged
pages are exactly its KV heads of the pages asked for, for sizes that shard and sizes
that replicate KV heads on either side; a destination whose regions do not fit its
stated size is refused before anything is computed."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.config import EngineConfig, ModelConfig, RopeConfig
from engine.errors import InvalidRequestError
from engine.parallel.layout import TPLayout
from kv_transfer import EndpointDescriptor, RegionSpec
from prefill_worker.kv_fanout import FanoutPlanner, KVStage, _head_copies
from worker.kv_layout import page_bytes, region_name, room_name, targets

PAGES, LAYERS, PAGE, HEAD_DIM = 12, 2, 4, 3
CONFIG = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=LAYERS,
                     num_heads=8, num_kv_heads=2, head_dim=HEAD_DIM, rms_norm_eps=1e-6, max_position_embeddings=64,
                     rope=RopeConfig(), tie_word_embeddings=False, qkv_bias=False, qk_norm=False,
                     eos_token_ids=(), bos_token_id=None)


def _engine(size: int, full: torch.Tensor) -> SimpleNamespace:
    """What KVStage reads of an engine at TP size `size` whose whole KV is `full`."""
    layout = TPLayout.of(CONFIG, size)
    buffers = [full[..., layout.kv_heads(r).start:layout.kv_heads(r).stop, :].contiguous() for r in range(size)]
    return SimpleNamespace(kv_buffers=lambda: buffers, tp_layout=layout, model_config=CONFIG,
                           config=EngineConfig(page_size=PAGE, num_pages=PAGES, max_num_batched_tokens=16,
                                               tensor_parallel_size=size))


@pytest.mark.parametrize("src, dst", [(1, 2), (2, 1), (1, 4), (4, 1), (2, 4), (4, 2), (8, 2), (1, 8)])
def test_staged_pages_hold_each_receiving_rank_heads(src: int, dst: int) -> None:
    full = torch.randn(PAGES, LAYERS, 2, PAGE, CONFIG.num_kv_heads, HEAD_DIM)
    layout = TPLayout.of(CONFIG, dst)
    stage = KVStage(_engine(src, full), layout, slots=5)  # type: ignore[arg-type]
    pages = [7, 2, 3, 11]
    stage.fill(pages)
    for rank, buffer in enumerate(stage.buffers):
        heads = layout.kv_heads(rank)
        assert buffer.shape == (5, LAYERS, 2, PAGE, layout.kv_heads_per_rank, HEAD_DIM)
        assert torch.equal(buffer[:4], full[pages][..., heads.start:heads.stop, :]), rank


def test_neighbouring_heads_of_one_rank_are_one_copy() -> None:
    config = CONFIG.__class__(**{**CONFIG.__dict__, "num_kv_heads": 4})
    src = TPLayout.of(config, 2)  # rank 0 holds heads 0, 1; rank 1 heads 2, 3
    assert _head_copies(src, range(0, 4)) == [(0, slice(0, 2), slice(0, 2)), (1, slice(0, 2), slice(2, 4))]
    assert _head_copies(src, range(1, 3)) == [(0, slice(1, 2), slice(0, 1)), (1, slice(0, 1), slice(1, 2))]


def test_names_at_size_one_are_the_plain_ones() -> None:
    assert (region_name(0, 1), room_name("r#1", 0, 1)) == ("kv", "r#1")
    assert [(t.region, t.room_id) for t in targets("r#1", 2)] == [("kv.tp2.0", "r#1.0"), ("kv.tp2.1", "r#1.1")]


class _Backend:
    def __init__(self) -> None:
        self.regions: dict[str, torch.Tensor] = {}

    async def register_region(self, name: str, tensor: torch.Tensor) -> None:
        assert name not in self.regions
        self.regions[name] = tensor


def _descriptor(size: int, page: int | None = None) -> EndpointDescriptor:
    layout = TPLayout.of(CONFIG, size)
    page = page or page_bytes(CONFIG, layout, PAGE)
    return EndpointDescriptor("tcp", "127.0.0.1:1", tuple(RegionSpec(region_name(r, size), page * PAGES, page)
                                                          for r in range(size)), "hash")


async def test_planner_stages_once_per_size_and_checks_regions() -> None:
    engine = _engine(1, torch.zeros(PAGES, LAYERS, 2, PAGE, 2, HEAD_DIM))
    backend = _Backend()
    planner = FanoutPlanner(engine, backend)  # type: ignore[arg-type]
    same = await planner.plan("room", "kv", 0, _descriptor(1))
    assert same.stage is None and [t.room_id for t in same.targets] == ["room"]
    first, second = [await planner.plan(room, "kv", 2, _descriptor(2)) for room in ("a", "b")]
    assert first.stage is second.stage is not None and sorted(backend.regions) == ["kv.tp2.0", "kv.tp2.1"]
    assert first.stage.slots == 16 // PAGE + 1
    with pytest.raises(InvalidRequestError, match="no region 'kv.tp4.0'"):
        await planner.plan("c", "kv", 4, _descriptor(2))
    with pytest.raises(InvalidRequestError, match="-byte pages"):
        await planner.plan("d", "kv", 2, _descriptor(2, page=8))
    with pytest.raises(InvalidRequestError, match="tensor-parallel size"):
        await planner.plan("e", "kv", 3, _descriptor(2))
