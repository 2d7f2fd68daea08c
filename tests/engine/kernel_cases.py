"""Shared set-up for the kernel tests: devices, sizes and random paged batches.

On CPU the kernels run under TRITON_INTERPRET=1 at tiny sizes in float32 (the
interpreter's bfloat16 arithmetic is not usable); on CUDA at model sizes in bfloat16.
"""
from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass

import pytest
import torch

from engine.batch import Batch, ScheduledRequest
from engine.config import ModelConfig, RopeConfig
from engine.kv_cache import KVCache
from engine.request import Request
from engine.sampling_params import SamplingParams

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(HAS_CUDA or not HAS_TRITON,
                                                 reason="interpreter tests run where there is no CUDA")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA or not HAS_TRITON,
                                                                    reason="needs CUDA and triton")]),
]


@dataclass(frozen=True)
class Sizes:
    dtype: torch.dtype
    tolerance: float
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    page_size: int
    long_context: int


SIZES = {
    "cpu": Sizes(torch.float32, 1e-4, 4, 2, 16, 48, 40, 4, 70),
    "cuda": Sizes(torch.bfloat16, 2e-2, 32, 8, 128, 4096, 14336, 16, 3000),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def model_config(sizes: Sizes, layers: int = 2) -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=64, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
        num_layers=layers, num_heads=sizes.heads, num_kv_heads=sizes.kv_heads, head_dim=sizes.head_dim,
        rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
                        original_max_position_embeddings=1024),
        tie_word_embeddings=False, qkv_bias=False, qk_norm=False, eos_token_ids=(), bos_token_id=None)


def random_cache(sizes: Sizes, num_pages: int, device: str, layers: int = 2,
                 dtype: torch.dtype | None = None) -> KVCache:
    cache = KVCache(model_config(sizes, layers), num_pages, sizes.page_size, device, dtype or sizes.dtype)
    cache.buffer.copy_(torch.randn(cache.buffer.shape, device=device))
    return cache


def paged_batch(seq_lens: list[int], query_lens: list[int], page_size: int, num_pages: int,
                device: str, seed: int = 0) -> Batch:
    """A batch whose sequences own random, scattered pages; filled as the runner does."""
    rng = random.Random(seed)
    free = list(range(num_pages))
    rng.shuffle(free)
    batch = Batch([])
    slots: list[int] = []
    for i, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
        request = Request(f"r{i}", [1] * seq_len, SamplingParams())
        request.pages = [free.pop() for _ in range(-(-seq_len // page_size))]
        request.num_computed_tokens = seq_len - query_len
        batch.scheduled.append(ScheduledRequest.of(request, query_len))
        slots.extend(request.pages[p // page_size] * page_size + p % page_size
                     for p in range(seq_len - query_len, seq_len))
        batch.query_lens.append(query_len)
        batch.seq_lens.append(seq_len)
        batch.page_tables.append(torch.tensor(request.pages, dtype=torch.long, device=device))
    batch.slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
    return batch
