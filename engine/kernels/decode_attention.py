"""Paged decode attention: one query token per sequence, GQA, split-K over the context.

Grid (sequence, KV head, split). A program holds the whole query-head group of its KV
head as the M side of a `tl.dot`, so each K/V tile is read once for the group. Long
contexts are cut into `num_splits` contiguous ranges; each writes a partial output and
its log-sum-exp, then counts itself done on a per-(sequence, KV head) semaphore; the
last split of the group to finish merges the partials and resets the semaphore, so no
second kernel runs (at batch 1 that launch was a measurable part of the step). The
split length is derived from the sequence length inside the kernel, so one grid serves
any lengths (CUDA graphs).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, final_ptr, sem_ptr, page_table_ptr, seq_lens_ptr, scale,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_pt,
    stride_ob, stride_oh, stride_os, stride_fb, stride_fh, num_heads, num_kv_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
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
        # Every thread's stores above precede the release below (barrier, then a
        # gpu-scope acq_rel add): the group's last split sees all partials.
        tl.debug_barrier()
        sem = sem_ptr + seq * num_kv_heads + kv_head
        done = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
        if done == NUM_SPLITS - 1:
            _merge_group(out_ptr, lse_ptr, final_ptr, seq, kv_head, stride_ob, stride_oh, stride_os,
                         stride_fb, stride_fh, num_heads, GROUP, HEAD_DIM, BLOCK_D, NUM_SPLITS, BLOCK_S)
            tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit
def _merge_group(partial_ptr, lse_ptr, out_ptr, seq, kv_head, stride_pb, stride_ph, stride_ps,
                 stride_ob, stride_oh, num_heads, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[h] = sum_s exp2(lse[h, s] - top) * partial[h, s] / sum_s exp2(lse[h, s] - top)
    for the query heads of one KV head. Loads bypass L1 (".cg"): the partials were
    written by other programs."""
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    for g in tl.static_range(GROUP):
        head = kv_head * GROUP + g
        lse = tl.load(lse_ptr + (seq * num_heads + head) * NUM_SPLITS + splits, mask=split_mask,
                      other=float("-inf"), cache_modifier=".cg")
        top = tl.max(lse, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        weights = tl.exp2(lse - top)
        total = tl.sum(weights, axis=0)
        total = tl.where(total == 0.0, 1.0, total)
        parts = tl.load(partial_ptr + seq * stride_pb + head * stride_ph + splits[:, None] * stride_ps
                        + dims[None, :], mask=split_mask[:, None] & dim_mask[None, :], other=0.0,
                        cache_modifier=".cg")
        out = tl.sum(parts * weights[:, None], axis=0) / total
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
                 mask=dim_mask)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      block_n: int = 64) -> int:
    """About one program per multiprocessor, never a split shorter than one block.
    Measured at batch 1 x 1,024 on an H200 (BENCHMARKS.md): 16 splits beat 33 and 64;
    large batches need no split at all."""
    wanted = math.ceil(num_sms / max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, math.ceil(max_seq_len / block_n), 64))


class _Semaphores:
    """Per-(sequence, KV head) counters the splits of a group count themselves done on;
    zero between launches (the merging program resets its own). One buffer per device,
    grown (never shrunk) to the largest batch seen, so CUDA graphs keep a stable address
    once their sizes were captured."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def get(self, count: int, device: torch.device) -> torch.Tensor:
        buffer = self._buffers.get(device)
        if buffer is None or buffer.numel() < count:
            buffer = torch.zeros(max(1024, triton.next_power_of_2(count)), dtype=torch.int32, device=device)
            self._buffers[device] = buffer
        return buffer


SEMAPHORES = _Semaphores()


def decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                     page_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     num_splits: int) -> torch.Tensor:
    """q [B, H, D] (last dim contiguous); k/v_pages [P, page, KV, D] one layer's views;
    page_table [B, W] int32; seq_lens [B] int32 (0 for padding rows) -> out [B, H, D]."""
    seqs, heads, head_dim = q.shape
    kv_heads, page_size = k_pages.shape[2], k_pages.shape[1]
    group = heads // kv_heads
    on_gpu = q.is_cuda
    block_n = 64 if on_gpu else 16
    out = torch.empty((seqs, heads, head_dim), dtype=q.dtype, device=q.device)
    if num_splits > 1:
        partial = torch.empty((seqs, heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((seqs, heads, num_splits), dtype=torch.float32, device=q.device)
        semaphores = SEMAPHORES.get(seqs * kv_heads, q.device)
        target, stride_os = partial, partial.stride(2)
    else:
        partial, lse, semaphores, target, stride_os = out, out, seq_lens, out, 0
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(seqs, kv_heads, num_splits)](
        q, k_pages, v_pages, target, lse, out, semaphores, page_table, seq_lens, scale * LOG2E,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        page_table.stride(0), target.stride(0), target.stride(1), stride_os,
        out.stride(0), out.stride(1), heads, kv_heads,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d, BLOCK_N=block_n, PAGE_SIZE=page_size, NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4, num_stages=3 if on_gpu else 1)
    return out
