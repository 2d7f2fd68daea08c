"""The GPU attention backend: Triton kernels over the paged KV cache, FlashAttention for
prefill.

A step's metadata (padded page table, offsets) is built once in `prepare` and shared by
all layers. A batch of single-token queries takes the split-K decode kernel. Prefill
sequences (fresh prompts, chunks over a cached prefix) take FlashAttention-2's varlen
forward through torch (`engine.attention.varlen`) where the cache's device and dtype
allow; otherwise (and for few queries over long prefixes) the ragged Triton prefill
kernel. In a mixed batch the leading decode rows keep the decode kernel. Which prefill
path a backend takes is decided, and logged, once when it is created. Triton is imported
when the backend is created, so registering it costs nothing on CPU.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, register_attention_backend
from engine.attention.varlen import (VarlenMetadata, VarlenPlan, flash_unavailable, flash_varlen, plan_varlen,
                                     worth_varlen)
from engine.batch import Batch
from engine.errors import ConfigError
from engine.kv_cache import KVCache
from engine.models.ops import TorchOps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonAttentionMetadata:
    page_table: torch.Tensor  # [B, W] int32; row i's first ceil(seq_lens[i] / page) entries are valid
    seq_lens: torch.Tensor  # [B] int32; 0 marks a padding row (CUDA graphs)
    query_start: torch.Tensor  # [B + 1] int32 offsets of each sequence's new tokens
    max_query_len: int
    num_splits: int  # decode only: context splits, fixed per CUDA graph
    # Lengths of the prompts when the batch is a few whole prompts with nothing cached and
    # the flash varlen path is off: their K/V are the step's own k/v, and torch's fused
    # SDPA is faster there than the Triton kernel (measured).
    whole_prompts: tuple[int, ...] | None = None
    # A mixed batch (decode rows first, as the scheduler orders them, then prefill chunks):
    # the decode rows take the decode kernel, the rest the prefill kernel. Through the
    # prefill kernel a decode row would fill one row of a 128-row tile.
    split: MixedSplit | None = None
    # The prefill sequences (all but a mixed batch's leading decode rows) through one
    # FlashAttention varlen call; None: the Triton prefill kernel (or SDPA) takes them.
    varlen: VarlenMetadata | None = None

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


@dataclass(frozen=True)
class MixedSplit:
    decode_rows: int  # the batch's first decode_rows sequences have one new token each
    decode_splits: int
    prefill_query_start: torch.Tensor  # [B - decode_rows + 1] int32, from 0
    prefill_max_query_len: int


def leading_decode_rows(query_lens: list[int]) -> int:
    count = 0
    for length in query_lens:
        if length != 1:
            break
        count += 1
    return count


def pack_int32(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """One host-to-device copy for several int32 arrays (pinned and non-blocking on CUDA,
    so preparing a step never waits for the GPU)."""
    flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]).astype(np.int32))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    sizes = [a.size for a in arrays]
    return [part.view(a.shape) for part, a in zip(flat.split(sizes), arrays)]


def host_page_table(batch: Batch, page_size: int, width: int | None = None) -> np.ndarray:
    """[B, W] int32 page ids covering each sequence's seq_len tokens (rest zero)."""
    needed = [-(-seq_len // page_size) for seq_len in batch.seq_lens]
    table = np.zeros((len(needed), width or max(needed, default=1) or 1), dtype=np.int32)
    for row, (item, count) in enumerate(zip(batch.scheduled, needed)):
        table[row, :count] = item.request.pages[:count]
    return table


@register_attention_backend
class TritonAttention(AttentionBackend):
    name = "triton"
    sdpa_max_prompts = 8  # more prompts than this: one Triton launch beats a loop of SDPA calls

    def __init__(self, kv_cache: KVCache, scale: float) -> None:
        super().__init__(kv_cache, scale)
        try:
            from engine.kernels import decode_attention, kv_write, prefill_attention, rotary
        except ImportError as exc:
            raise ConfigError(f"attention backend 'triton' needs triton installed: {exc}") from exc
        self._decode, self._prefill, self._write = decode_attention, prefill_attention, kv_write
        self._rotary = rotary
        device = kv_cache.buffer.device
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 4)
        # Prefill through FlashAttention varlen where it can serve this cache; a benchmark
        # may turn it off to time the Triton kernel on the same batch.
        self.flash_prefill = self._choose_flash_prefill()

    def _choose_flash_prefill(self) -> bool:
        buffer = self.kv_cache.buffer
        kv_heads, head_dim = buffer.shape[-2], buffer.shape[-1]
        reason: str | None
        # Opt-in: on one H100 (torch 2.11, 2026-12-07) the varlen call ran one layer of
        # 4 x 2,048 at 274 TFLOP/s against 346 for SDPA per prompt, and 256 against 309 for
        # the Triton kernel with half of each sequence cached (BENCHMARKS.md).
        if os.environ.get("EPD_FLASH_PREFILL", "0") != "1":
            reason = "off unless EPD_FLASH_PREFILL=1"
        elif not buffer.is_contiguous():
            reason = "the KV cache buffer is not contiguous"
        else:  # the backend is not told the query heads: the check call uses groups of 4
            reason = flash_unavailable(buffer.device, buffer.dtype, 4 * kv_heads, kv_heads, head_dim)
        if buffer.device.type == "cuda":  # on CPU there is no choice to report
            logger.info("prefill attention: %s", "FlashAttention varlen (torch)" if reason is None
                        else f"Triton paged kernel ({reason})")
        return reason is None

    def num_splits(self, num_seqs: int, max_seq_len: int) -> int:
        return self._decode.choose_num_splits(num_seqs, self.kv_cache.buffer.shape[4], max_seq_len, self.num_sms)

    def prepare(self, batch: Batch) -> None:
        page_table = host_page_table(batch, self.kv_cache.page_size)
        seq_lens = np.asarray(batch.seq_lens, dtype=np.int32)
        query_start = np.zeros(len(batch.query_lens) + 1, dtype=np.int32)
        np.cumsum(batch.query_lens, out=query_start[1:])
        decode_rows = leading_decode_rows(batch.query_lens)
        mixed = 0 < decode_rows < len(batch.query_lens)
        plan = self._varlen_plan(batch, page_table, decode_rows)
        arrays = [page_table, seq_lens, query_start] + ([query_start[decode_rows:] - decode_rows] if mixed else [])
        if plan is not None:
            arrays += [plan.cu_seq_q, plan.cu_seq_k] + ([] if plan.gather_rows is None else [plan.gather_rows])
        page_table_dev, seq_lens_dev, query_start_dev, *rest = pack_int32(arrays, self.kv_cache.buffer.device)
        whole = plan is None and batch.query_lens == batch.seq_lens and 1 < max(batch.query_lens, default=0) and \
            len(batch.query_lens) <= self.sdpa_max_prompts
        split = None
        if mixed:
            split = MixedSplit(decode_rows, self.num_splits(decode_rows, max(batch.seq_lens[:decode_rows])),
                               rest.pop(0), max(batch.query_lens[decode_rows:]))
        flash = None if plan is None else VarlenMetadata(plan.first_token, rest[0], rest[1], plan.max_q, plan.max_k,
                                                         rest[2] if plan.gather_rows is not None else None)
        batch.attention_metadata = TritonAttentionMetadata(
            page_table_dev, seq_lens_dev, query_start_dev, max(batch.query_lens, default=0),
            self.num_splits(len(batch.seq_lens), max(batch.seq_lens, default=1)),
            tuple(batch.query_lens) if whole else None, split, flash)

    def _varlen_plan(self, batch: Batch, page_table: np.ndarray, decode_rows: int) -> VarlenPlan | None:
        """The flash call for every sequence after the leading decode rows, if it should
        take one (None: a decode batch, flash unavailable, or too few queries per key)."""
        if not self.flash_prefill or decode_rows == len(batch.query_lens) or \
                not worth_varlen(batch.query_lens[decode_rows:], batch.seq_lens[decode_rows:]):
            return None
        return plan_varlen(batch.query_lens, batch.seq_lens, page_table, self.kv_cache.page_size,
                           self.kv_cache.rows_per_page, decode_rows)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        k_pages, v_pages = self.kv_cache.layer_views(layer)
        self._write.write_kv(k, v, k_pages, v_pages, batch.slot_mapping)
        return self._attend(layer, q, k, v, batch)

    def rotate_and_attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor], batch: Batch, ops: TorchOps,
    ) -> torch.Tensor:
        if ops.name != "triton":  # the reference ops rotate: keep their arithmetic
            return super().rotate_and_attend(layer, q, k, v, cos_sin, batch, ops)
        k_pages, v_pages = self.kv_cache.layer_views(layer)
        self._rotary.rotary_and_write_kv(q, k, v, *cos_sin, k_pages, v_pages, batch.slot_mapping)
        return self._attend(layer, q, k, v, batch)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Attention of the step's (rotated) q over keys whose new rows k/v are already in
        the pages."""
        meta: TritonAttentionMetadata = batch.attention_metadata
        k_pages, v_pages = self.kv_cache.layer_views(layer)
        if meta.is_decode:
            return self._decode.decode_attention(q, k_pages, v_pages, meta.page_table, meta.seq_lens,
                                                 self.scale, meta.num_splits)
        if meta.varlen is not None:
            return self._varlen(layer, q, k, v, meta, meta.varlen)
        if meta.whole_prompts is not None:
            return self._whole_prompts(q, k, v, meta.whole_prompts)
        if meta.split is not None:
            return self._mixed(q, k_pages, v_pages, meta, meta.split)
        return self._prefill.prefill_attention(q, k_pages, v_pages, meta.page_table, meta.query_start,
                                               meta.seq_lens, meta.max_query_len, self.scale)

    def _varlen(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: TritonAttentionMetadata, plan: VarlenMetadata) -> torch.Tensor:
        first = plan.first_token
        if plan.gather_rows is None:  # nothing cached: the keys are the step's own
            keys, values = k[first:], v[first:]
        else:
            k_rows, v_rows = self.kv_cache.token_rows(layer)
            keys, values = k_rows.index_select(0, plan.gather_rows), v_rows.index_select(0, plan.gather_rows)
        attended = flash_varlen(q[first:], keys, values, plan, self.scale)
        if first == 0:
            return attended
        assert meta.split is not None and meta.split.decode_rows == first  # the leading decode rows
        out = self._leading_decodes(q, *self.kv_cache.layer_views(layer), meta, meta.split)
        out[first:] = attended
        return out

    def _leading_decodes(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                         meta: TritonAttentionMetadata, split: MixedSplit) -> torch.Tensor:
        """An output for all of q's rows with a mixed batch's leading decode rows filled in
        by the decode kernel (the rest is the caller's to write)."""
        out = torch.empty_like(q)
        d = split.decode_rows
        self._decode.decode_attention(q[:d], k_pages, v_pages, meta.page_table[:d], meta.seq_lens[:d],
                                      self.scale, split.decode_splits, out=out[:d])
        return out

    def _mixed(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
               meta: TritonAttentionMetadata, split: MixedSplit) -> torch.Tensor:
        out = self._leading_decodes(q, k_pages, v_pages, meta, split)
        d = split.decode_rows
        self._prefill.prefill_attention(q[d:], k_pages, v_pages, meta.page_table[d:], split.prefill_query_start,
                                        meta.seq_lens[d:], split.prefill_max_query_len, self.scale, out=out[d:])
        return out

    def _whole_prompts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       lengths: tuple[int, ...]) -> torch.Tensor:
        if len(set(lengths)) == 1:  # prompts of one length: one SDPA call over the batch
            count, length = len(lengths), lengths[0]
            # [B * L, heads, D] -> [B, heads, L, D] views (no copies); SDPA repeats K/V heads itself.
            views = [t.view(count, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)]
            attended = F.scaled_dot_product_attention(*views, is_causal=True, scale=self.scale, enable_gqa=True)
            # The fused kernels lay their output out as [B, L, heads, D]: reshape is then a view.
            return attended.transpose(1, 2).reshape(q.shape)
        out = torch.empty_like(q)
        start = 0
        for length in lengths:
            rows = slice(start, start + length)
            # [L, heads, D] -> [1, heads, L, D] views; SDPA repeats K/V heads itself.
            attended = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None], k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None],
                is_causal=True, scale=self.scale, enable_gqa=True)
            out[rows] = attended[0].transpose(0, 1)
            start += length
        return out
