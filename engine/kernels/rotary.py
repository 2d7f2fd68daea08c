"""Rotary embedding (rotate-half convention) applied in place to q and k."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
                   BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr):
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
            num_warps=4)
    return q, k
