"""Causal attention for a ragged batch whose keys live in pages (prefix included).

Grid (sequence, query head, query block). The new K/V are already in the pages, so a
sequence's keys are tokens [0, seq_len) read through its page table; its queries are
the last query_len positions. Key blocks wholly below a query block's first position
need no mask; only the diagonal band is masked.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


class PrefillConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    k_transposed: bool = False  # load K as [D, BLOCK_N] straight from memory


# The fastest of bench/kernel_sweep.py's tiles for head_dim 128 on an H200; tiny tiles keep
# the interpreter fast.
GPU_CONFIG = PrefillConfig(128, 32, 4, 4)
# Batches whose sequences have at most 16 new tokens each (speculation's verify steps,
# K + 1 per request): a 128-row query tile would be mostly empty rows; 16 is tl.dot's
# smallest M. Not tuned by a sweep yet.
SHORT_QUERY_CONFIG = PrefillConfig(16, 64, 4, 3)
INTERPRETER_CONFIG = PrefillConfig(16, 16, 4, 1)


@triton.jit
def _attend_block(q, acc, m_i, l_i, k_ptr, v_ptr, page_row_ptr, block_start, positions,
                  seq_len, kv_base, stride_kp, stride_kt, dims, dim_mask, scale,
                  BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr,
                  EVEN_D: tl.constexpr, K_T: tl.constexpr):
    """One key block of online softmax. Unmasked blocks lie wholly below every row's
    position (so also below seq_len): their loads need no mask at all. No row's maximum
    is ever -inf: the first block processed holds key 0, which every row sees."""
    tokens = block_start + tl.arange(0, BLOCK_N)
    if MASKED:
        token_mask = tokens < seq_len
        pages = tl.load(page_row_ptr + tokens // PAGE_SIZE, mask=token_mask, other=0)
    else:
        pages = tl.load(page_row_ptr + tokens // PAGE_SIZE)
    offsets = pages.to(tl.int64) * stride_kp + (tokens % PAGE_SIZE) * stride_kt + kv_base
    # K as [D, BLOCK_N] (K_T, read transposed from memory) or [BLOCK_N, D] then a transposed view.
    if MASKED:
        tile_mask = token_mask[:, None] & dim_mask[None, :]
        if K_T:
            kt = tl.load(k_ptr + offsets[None, :] + dims[:, None], mask=tl.trans(tile_mask), other=0.0)
        else:
            kt = tl.trans(tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=tile_mask, other=0.0))
        v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=tile_mask, other=0.0)
    elif EVEN_D:
        if K_T:
            kt = tl.load(k_ptr + offsets[None, :] + dims[:, None])
        else:
            kt = tl.trans(tl.load(k_ptr + offsets[:, None] + dims[None, :]))
        v = tl.load(v_ptr + offsets[:, None] + dims[None, :])
    else:
        if K_T:
            kt = tl.load(k_ptr + offsets[None, :] + dims[:, None], mask=dim_mask[:, None], other=0.0)
        else:
            kt = tl.trans(tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=dim_mask[None, :], other=0.0))
        v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=dim_mask[None, :], other=0.0)
    scores = tl.dot(q, kt)
    if MASKED:
        visible = (tokens[None, :] <= positions[:, None]) & token_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    # `scale` carries log2(e): scale and shift fuse into one multiply-add per score.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1) * scale)
    p = tl.exp2(scores * scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)  # accumulate inside the matrix op
    return acc, m_new, l_i * alpha + tl.sum(p, axis=1)


# A mixed batch passes row slices (page_table[d:], seq_lens[d:]) whose start is not
# 16-byte aligned for most d: specialising on their alignment compiled a kernel per
# alignment class mid-serving. They are read a scalar at a time, so nothing is lost.
@triton.jit(do_not_specialize=["stride_pt"],
            do_not_specialize_on_alignment=["page_table_ptr", "query_start_ptr", "seq_lens_ptr"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, page_table_ptr, query_start_ptr, seq_lens_ptr, scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kp, stride_kt, stride_kh, stride_pt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, K_T: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    query_block = tl.num_programs(2) - 1 - tl.program_id(2)  # the longest rows first
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if query_block * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        prefix = seq_len - q_len
        rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < q_len
        positions = prefix + rows
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < HEAD_DIM
        token_rows = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + token_rows[:, None] * stride_qt + head * stride_qh + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_base = (head // GROUP) * stride_kh
        page_row_ptr = page_table_ptr + seq * stride_pt
        # Every row of the block sees keys [0, first position]; blocks inside need no mask.
        unmasked_end = ((prefix + query_block * BLOCK_M + 1) // BLOCK_N) * BLOCK_N
        visible_end = tl.minimum(seq_len, prefix + (query_block + 1) * BLOCK_M)
        for block_start in range(0, unmasked_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, k_ptr, v_ptr, page_row_ptr, block_start,
                                          positions, seq_len, kv_base, stride_kp, stride_kt, dims,
                                          dim_mask, scale, BLOCK_N, PAGE_SIZE, False, BLOCK_D == HEAD_DIM, K_T)
        for block_start in range(unmasked_end, visible_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, k_ptr, v_ptr, page_row_ptr, block_start,
                                          positions, seq_len, kv_base, stride_kp, stride_kt, dims,
                                          dim_mask, scale, BLOCK_N, PAGE_SIZE, True, BLOCK_D == HEAD_DIM, K_T)
        out = acc / l_i[:, None]
        tl.store(out_ptr + token_rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def prefill_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                      page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
                      max_query_len: int, scale: float, config: PrefillConfig | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] of all sequences' new tokens, in order; query_start [B + 1] int32
    offsets into T; seq_lens [B] int32; page_table [B, W] int32 -> out [T, H, D]
    (written into `out` when given: rows of a larger output, last dim contiguous)."""
    tokens, heads, head_dim = q.shape
    seqs = seq_lens.shape[0]
    group = heads // k_pages.shape[2]
    if config is None:
        config = INTERPRETER_CONFIG if not q.is_cuda else SHORT_QUERY_CONFIG if max_query_len <= 16 else GPU_CONFIG
    block_m, block_n, warps, stages, k_t = config
    if out is None:
        out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0:
        return out
    _prefill_kernel[(seqs, heads, triton.cdiv(max_query_len, block_m))](
        q, k_pages, v_pages, out, page_table, query_start, seq_lens, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), page_table.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGE_SIZE=k_pages.shape[1], K_T=k_t,
        num_warps=warps, num_stages=stages)
    return out
