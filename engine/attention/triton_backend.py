"""The GPU attention backend: Triton kernels over the paged KV cache.

A step's metadata (padded page table, offsets) is built once in `prepare` and shared by
all layers. A batch of single-token queries takes the split-K decode kernel; any other
batch (prefill chunks, mixed with decodes) takes the ragged prefill kernel. Triton is
imported when the backend is created, so registering it costs nothing on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, register_attention_backend
from engine.batch import Batch
from engine.errors import ConfigError
from engine.kv_cache import KVCache
from engine.models.ops import TorchOps


@dataclass(frozen=True)
class TritonAttentionMetadata:
    page_table: torch.Tensor  # [B, W] int32; row i's first ceil(seq_lens[i] / page) entries are valid
    seq_lens: torch.Tensor  # [B] int32; 0 marks a padding row (CUDA graphs)
    query_start: torch.Tensor  # [B + 1] int32 offsets of each sequence's new tokens
    max_query_len: int
    num_splits: int  # decode only: context splits, fixed per CUDA graph
    # Lengths of the prompts when the batch is a few whole prompts with nothing cached:
    # their K/V are the step's own k/v, and torch's fused SDPA is faster there (measured).
    whole_prompts: tuple[int, ...] | None = None
    # A mixed batch (decode rows first, as the scheduler orders them, then prefill chunks):
    # the decode rows take the decode kernel, the rest the prefill kernel. Through the
    # prefill kernel a decode row would fill one row of a 128-row tile.
    split: MixedSplit | None = None

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

    def num_splits(self, num_seqs: int, max_seq_len: int) -> int:
        return self._decode.choose_num_splits(num_seqs, self.kv_cache.buffer.shape[4], max_seq_len, self.num_sms)

    def prepare(self, batch: Batch) -> None:
        page_table = host_page_table(batch, self.kv_cache.page_size)
        seq_lens = np.asarray(batch.seq_lens, dtype=np.int32)
        query_start = np.zeros(len(batch.query_lens) + 1, dtype=np.int32)
        np.cumsum(batch.query_lens, out=query_start[1:])
        decode_rows = leading_decode_rows(batch.query_lens)
        mixed = 0 < decode_rows < len(batch.query_lens)
        arrays = [page_table, seq_lens, query_start] + ([query_start[decode_rows:] - decode_rows] if mixed else [])
        page_table_dev, seq_lens_dev, query_start_dev, *rest = pack_int32(arrays, self.kv_cache.buffer.device)
        whole = batch.query_lens == batch.seq_lens and 1 < max(batch.query_lens, default=0) and \
            len(batch.query_lens) <= self.sdpa_max_prompts
        split = None
        if mixed:
            split = MixedSplit(decode_rows, self.num_splits(decode_rows, max(batch.seq_lens[:decode_rows])),
                               rest[0], max(batch.query_lens[decode_rows:]))
        batch.attention_metadata = TritonAttentionMetadata(
            page_table_dev, seq_lens_dev, query_start_dev, max(batch.query_lens, default=0),
            self.num_splits(len(batch.seq_lens), max(batch.seq_lens, default=1)),
            tuple(batch.query_lens) if whole else None, split)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        k_pages, v_pages = self.kv_cache.layer_views(layer)
        self._write.write_kv(k, v, k_pages, v_pages, batch.slot_mapping)
        return self._attend(q, k, v, k_pages, v_pages, batch)

    def rotate_and_attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor], batch: Batch, ops: TorchOps,
    ) -> torch.Tensor:
        if ops.name != "triton":  # the reference ops rotate: keep their arithmetic
            return super().rotate_and_attend(layer, q, k, v, cos_sin, batch, ops)
        k_pages, v_pages = self.kv_cache.layer_views(layer)
        self._rotary.rotary_and_write_kv(q, k, v, *cos_sin, k_pages, v_pages, batch.slot_mapping)
        return self._attend(q, k, v, k_pages, v_pages, batch)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor,
                v_pages: torch.Tensor, batch: Batch) -> torch.Tensor:
        meta: TritonAttentionMetadata = batch.attention_metadata
        if meta.is_decode:
            return self._decode.decode_attention(q, k_pages, v_pages, meta.page_table, meta.seq_lens,
                                                 self.scale, meta.num_splits)
        if meta.whole_prompts is not None:
            return self._whole_prompts(q, k, v, meta.whole_prompts)
        if meta.split is not None:
            return self._mixed(q, k_pages, v_pages, meta, meta.split)
        return self._prefill.prefill_attention(q, k_pages, v_pages, meta.page_table, meta.query_start,
                                               meta.seq_lens, meta.max_query_len, self.scale)

    def _mixed(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
               meta: TritonAttentionMetadata, split: MixedSplit) -> torch.Tensor:
        out = torch.empty_like(q)
        d = split.decode_rows
        self._decode.decode_attention(q[:d], k_pages, v_pages, meta.page_table[:d], meta.seq_lens[:d],
                                      self.scale, split.decode_splits, out=out[:d])
        self._prefill.prefill_attention(q[d:], k_pages, v_pages, meta.page_table[d:], split.prefill_query_start,
                                        meta.seq_lens[d:], split.prefill_max_query_len, self.scale, out=out[d:])
        return out

    def _whole_prompts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       lengths: tuple[int, ...]) -> torch.Tensor:
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
