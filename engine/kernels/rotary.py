"""Rotary embedding (rotate-half convention) applied in place to q and k."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import wait_and_release


@triton.jit
def _rotate_heads(base, stride_head, num_heads, cos, sin, half_cols, half_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    mask = (heads < num_heads)[:, None] & half_mask[None, :]
    first = base + heads[:, None] * stride_head + half_cols[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos[None, :] - x2 * sin[None, :]).to(base.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cos, stride_sin, num_q_heads, num_k_heads,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, USE_PDL: tl.constexpr = False):
    wait_and_release(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    # cos/sin rows repeat their first half (cat(freqs, freqs)): read it once.
    cos = tl.load(cos_ptr + token * stride_cos + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_sin + cols, mask=col_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, num_q_heads, cos, sin, cols, col_mask, HALF, BLOCK_QH)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, num_k_heads, cos, sin, cols, col_mask, HALF, BLOCK_KH)


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KV, D] in place (strided views are fine as long as
    the last dim is contiguous); cos/sin [T, D]. Returns (q, k)."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
    tokens, half = q.shape[0], q.shape[-1] // 2
    if tokens:
        _rotary_kernel[(tokens,)](
            q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos.stride(0), sin.stride(0), q.shape[1], k.shape[1],
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_QH=triton.next_power_of_2(q.shape[1]), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            num_warps=4, **pdl.launch(q))
    return q, k


@triton.jit
def _rotary_kv_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_cos, stride_sin, stride_page, stride_slot, stride_cache_h,
                            num_q_heads, num_k_heads,
                            HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_QH: tl.constexpr,
                            BLOCK_KH: tl.constexpr, PAGE_SIZE: tl.constexpr, USE_PDL: tl.constexpr = False):
    wait_and_release(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cos = tl.load(cos_ptr + token * stride_cos + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_sin + cols, mask=col_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, num_q_heads, cos, sin, cols, col_mask, HALF, BLOCK_QH)
    # k: rotate in registers, store in place (the SDPA path reads it) and into its slot.
    heads = tl.arange(0, BLOCK_KH)
    mask = (heads < num_k_heads)[:, None] & col_mask[None, :]
    first = k_ptr + token * stride_kt + heads[:, None] * stride_kh + cols[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    r1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(k_ptr.dtype.element_ty)
    r2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(k_ptr.dtype.element_ty)
    tl.store(first, r1, mask=mask)
    tl.store(first + HALF, r2, mask=mask)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    # Negative slots mark padded rows of a CUDA-graph batch: nothing to store.
    if slot >= 0:
        dst = (slot // PAGE_SIZE) * stride_page + (slot % PAGE_SIZE) * stride_slot \
            + heads[:, None] * stride_cache_h + cols[None, :]
        tl.store(k_cache_ptr + dst, r1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_cache_ptr + dst + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v_src = v_ptr + token * stride_vt + heads[:, None] * stride_vh + cols[None, :]
        v1 = tl.load(v_src, mask=mask, other=0.0)
        v2 = tl.load(v_src + HALF, mask=mask, other=0.0)
        tl.store(v_cache_ptr + dst, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                        slots: torch.Tensor) -> None:
    """`apply_rotary_(q, k, cos, sin)` and `kv_write.write_kv(k, v, ...)` in one launch:
    q and k rotated in place, the rotated k and v stored at their flat slots of one
    layer's k/v_pages [P, page, KV, D] (negative slot: not stored)."""
    for t in (q, k, v, cos, sin):
        assert t.stride(-1) == 1
    assert k_pages.stride(3) == 1 and k_pages.stride() == v_pages.stride()
    tokens, half = q.shape[0], q.shape[-1] // 2
    if tokens:
        _rotary_kv_write_kernel[(tokens,)](
            q, k, v, cos, sin, k_pages, v_pages, slots,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos.stride(0), sin.stride(0), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
            q.shape[1], k.shape[1], HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_QH=triton.next_power_of_2(q.shape[1]), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            PAGE_SIZE=k_pages.shape[1], num_warps=4, **pdl.launch(q))
