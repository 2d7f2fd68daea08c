"""Paged decode attention: one query token per sequence, GQA, split-K over the context.

Grid (sequence, KV head, split). A program holds the whole query-head group of its KV
head as the M side of a `tl.dot`, so each K/V tile is read once for the group. Long
contexts are cut into `num_splits` contiguous ranges; each writes a partial output and
its log-sum-exp, and a second kernel merges them. The split length is derived from the
sequence length inside the kernel, so one grid serves any lengths (CUDA graphs).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import wait_and_release

LOG2E = 1.4426950408889634


# The page-table row stride (the batch's widest sequence in pages) changes from step to
# step: not specialised on, so it costs no recompilation. Nor is the alignment of the page
# table and seq_lens: eager steps pass slices of one packed int32 upload, whose offsets
# move with the batch's shape (a variant first met under load stalled a step to compile).
@triton.jit(do_not_specialize=["stride_pt"],
            do_not_specialize_on_alignment=["page_table_ptr", "seq_lens_ptr"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, page_table_ptr, seq_lens_ptr, scale,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_pt,
    stride_ob, stride_oh, stride_os, num_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    wait_and_release(USE_PDL)
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    rows = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows
    head_mask = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    kv_base = kv_head * stride_kh
    for block_start in range(start, end, BLOCK_N):
        tokens = block_start + tl.arange(0, BLOCK_N)
        token_mask = tokens < end
        pages = tl.load(page_table_ptr + seq * stride_pt + tokens // PAGE_SIZE, mask=token_mask, other=0)
        offsets = pages.to(tl.int64) * stride_kp + (tokens % PAGE_SIZE) * stride_kt + kv_base
        tile_mask = token_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=tile_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_H, BLOCK_N], log2 units
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=tile_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_mask = head_mask[:, None] & dim_mask[None, :]
    # An empty range (padding row, or a split past the end) leaves l_i == 0.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_offsets = seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    if NUM_SPLITS > 1:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_ptr + (seq * num_heads + heads) * NUM_SPLITS + split, lse, mask=head_mask)


@triton.jit
def _merge_splits_kernel(partial_ptr, lse_ptr, out_ptr, stride_pb, stride_ph, stride_ps,
                         stride_ob, stride_oh, num_heads,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr = False):
    wait_and_release(USE_PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < NUM_SPLITS
    lse = tl.load(lse_ptr + (seq * num_heads + head) * NUM_SPLITS + splits, mask=split_mask,
                  other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp2(lse - top)
    total = tl.sum(weights, axis=0)
    total = tl.where(total == 0.0, 1.0, total)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    parts = tl.load(partial_ptr + seq * stride_pb + head * stride_ph + splits[:, None] * stride_ps
                    + dims[None, :], mask=split_mask[:, None] & dim_mask[None, :], other=0.0)
    out = tl.sum(parts * weights[:, None], axis=0) / total
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dim_mask)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      block_n: int = 64) -> int:
    """About one program per multiprocessor, never a split shorter than one block; large
    batches need no split (and so no merge kernel). Measured at batch 1 x 1,024 on an
    H200 (bench/kernel_sweep.py, BENCHMARKS.md): 16 splits beat 33 and 64.
    Rounded down to a power of two (SPLIT_COUNTS): NUM_SPLITS is a compile-time constant,
    so every distinct count is a kernel to compile, and a mixed step meeting a new count
    waited ~1 s for it under load; `warm_up` compiles these few at start."""
    wanted = math.ceil(num_sms / max(1, num_seqs * num_kv_heads))
    count = max(1, min(wanted, math.ceil(max_seq_len / block_n), 64))
    return 1 << (count.bit_length() - 1)


SPLIT_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def warm_up(k_pages: torch.Tensor, v_pages: torch.Tensor, num_heads: int, dtype: torch.dtype) -> None:
    """Compile the kernels for every split count before serving: one padding row
    (seq_len 0, nothing read) per count."""
    device = k_pages.device
    q = torch.zeros((1, num_heads, k_pages.shape[3]), dtype=dtype, device=device)
    page_table = torch.zeros((1, 1), dtype=torch.int32, device=device)
    seq_lens = torch.zeros(1, dtype=torch.int32, device=device)
    for splits in SPLIT_COUNTS:
        decode_attention(q, k_pages, v_pages, page_table, seq_lens, 1.0, splits)


def decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                     page_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     num_splits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D] (last dim contiguous); k/v_pages [P, page, KV, D] one layer's views;
    page_table [B, W] int32; seq_lens [B] int32 (0 for padding rows) -> out [B, H, D]
    (written into `out` when given: rows of a larger output, last dim contiguous)."""
    seqs, heads, head_dim = q.shape
    kv_heads, page_size = k_pages.shape[2], k_pages.shape[1]
    group = heads // kv_heads
    on_gpu = q.is_cuda
    block_n = 64 if on_gpu else 16
    if out is None:
        out = torch.empty((seqs, heads, head_dim), dtype=q.dtype, device=q.device)
    if num_splits > 1:
        partial = torch.empty((seqs, heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((seqs, heads, num_splits), dtype=torch.float32, device=q.device)
        target, stride_os = partial, partial.stride(2)
    else:
        partial, lse, target, stride_os = out, out, out, 0
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(seqs, kv_heads, num_splits)](
        q, k_pages, v_pages, target, lse, page_table, seq_lens, scale * LOG2E,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        page_table.stride(0), target.stride(0), target.stride(1), stride_os, heads,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d, BLOCK_N=block_n, PAGE_SIZE=page_size, NUM_SPLITS=num_splits,
        num_warps=4, num_stages=3 if on_gpu else 1, **pdl.launch(q))
    if num_splits > 1:
        _merge_splits_kernel[(seqs, heads)](
            partial, lse, out, partial.stride(0), partial.stride(1), partial.stride(2),
            out.stride(0), out.stride(1), heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4, **pdl.launch(partial))
    return out
