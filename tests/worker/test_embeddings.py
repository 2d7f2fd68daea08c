"""Embedding slots, the embedding cache and the embedding compatibility hash."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from engine.multimodal import MultimodalInfo
from worker.embeddings import EmbeddingCache, SlotPool, embedding_buffer, embedding_compat_hash

INFO = MultimodalInfo(image_token_id=9, image_token="<image>", num_image_tokens=4, hidden_size=8)


async def test_slots_are_exclusive_and_waiters_wake_on_release() -> None:
    pool = SlotPool(2)
    a, b = await pool.acquire(1), await pool.acquire(1)
    assert {a, b} == {0, 1} and pool.free == 0
    with pytest.raises(asyncio.TimeoutError):
        await pool.acquire(0.05)
    waiter = asyncio.ensure_future(pool.acquire(2))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await pool.release(a)
    assert await waiter == a
    await pool.release(b)
    with pytest.raises(AssertionError, match="twice"):
        await pool.release(b)
    with pytest.raises(ValueError):
        SlotPool(0)


def test_cache_evicts_least_recently_used_within_its_bytes() -> None:
    entry = torch.zeros(4, 8)  # 128 bytes
    cache = EmbeddingCache(capacity_bytes=3 * 128)
    for key in "abc":
        cache.put(key, entry.clone())
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", entry.clone())
    assert len(cache) == 3 and cache.get("b") is None and cache.get("c") is not None
    assert cache.hits_total == 2 and cache.bytes == 3 * 128
    assert EmbeddingCache(0).put("x", entry) is None and len(EmbeddingCache(0)) == 0
    assert cache.clear() == 3 and cache.bytes == 0 and cache.get("a") is None


def test_buffer_shape_and_compat_hash_follow_the_vision_config(tmp_path: Path) -> None:
    assert embedding_buffer(INFO, 3, torch.bfloat16, "cpu").shape == (3, 4, 8)
    config = {"vision_config": {"hidden_size": 32, "image_size": 64}, "projector_hidden_act": "gelu",
              "text_config": {"hidden_size": 8}}
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a, b):
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
    same = embedding_compat_hash(a, INFO, "float32")
    assert same == embedding_compat_hash(b, INFO, "float32")  # location does not matter
    assert same != embedding_compat_hash(a, INFO, "bfloat16")
    (b / "config.json").write_text(json.dumps({**config, "vision_config": {"hidden_size": 64, "image_size": 64}}))
    assert same != embedding_compat_hash(b, INFO, "float32")
