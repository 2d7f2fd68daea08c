"""Writes a step's new K/V into their page slots of one layer."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import wait_and_release


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                     stride_kt, stride_vt, stride_page, stride_slot,
                     ROW: tl.constexpr, BLOCK: tl.constexpr, PAGE_SIZE: tl.constexpr, USE_PDL: tl.constexpr = False):
    wait_and_release(USE_PDL)
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    # Negative slots mark padded rows of a CUDA-graph batch: nothing to store.
    if slot >= 0:
        cols = tl.arange(0, BLOCK)
        mask = cols < ROW
        dst = (slot // PAGE_SIZE) * stride_page + (slot % PAGE_SIZE) * stride_slot + cols
        k = tl.load(k_ptr + token.to(tl.int64) * stride_kt + cols, mask=mask)
        v = tl.load(v_ptr + token.to(tl.int64) * stride_vt + cols, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k/v [T, KV, D] -> k_pages/v_pages [P, page, KV, D] (one layer's strided views) at
    flat slots page * page_size + offset. Each token's KV * D values are contiguous on
    both sides (asserted)."""
    tokens, kv_heads, head_dim = k.shape
    row = kv_heads * head_dim
    for t in (k, v):
        assert t.stride(2) == 1 and t.stride(1) == head_dim
    assert k_pages.stride(2) == head_dim and k_pages.stride(3) == 1 and k_pages.stride() == v_pages.stride()
    if tokens:
        _kv_write_kernel[(tokens,)](
            k, v, k_pages, v_pages, slots, k.stride(0), v.stride(0), k_pages.stride(0), k_pages.stride(1),
            ROW=row, BLOCK=triton.next_power_of_2(row), PAGE_SIZE=k_pages.shape[1], num_warps=4, **pdl.launch(k))
