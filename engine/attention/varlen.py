"""FlashAttention-2's variable-length forward through torch, for prefill batches.

One call attends every prefill sequence of a step: queries and keys are packed
[tokens, heads, head_dim] with int32 cumulative offsets per sequence, K/V heads may
divide the query heads (GQA), and a causal sequence whose keys outnumber its queries has
its mask aligned to the bottom right: query i of a chunk sees keys up to
seq_len - query_len + i, which is exactly a chunk over a cached prefix.

The op is `torch.ops.aten._flash_attention_forward`, not the public
`torch.nn.attention.varlen.varlen_attn`: the public function changed its signature in
each of torch 2.10 (`is_causal` argument), 2.11 (`window_size`, `scale`) and 2.12
(`enable_gqa` required for GQA), and every call goes through a Python custom op, while
the aten op's positional arguments and `scale` keyword are the same from torch 2.5 to
2.13. Keys that live in pages (a cached prefix) are first gathered into a packed buffer:
FA2's own paged mode wants pages of 256 tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

FLASH_DTYPES = (torch.float16, torch.bfloat16)
# Below this many queries per key (weighted by keys), gathering a prefix's K/V out of the
# pages costs more than the faster kernel saves (speculative verification: a few queries
# over a long context); such batches stay on the Triton kernel, which reads the pages.
MIN_QUERIES_PER_GATHERED_KEY = 64


@dataclass(frozen=True)
class VarlenPlan:
    """Host side of one varlen call over sequences [first_row, B) of a batch, whose new
    tokens are rows [first_token, T) of the step's q."""

    first_token: int
    cu_seq_q: np.ndarray  # [n + 1] int32, query offsets from 0
    cu_seq_k: np.ndarray  # [n + 1] int32, key offsets from 0
    max_q: int
    max_k: int
    # [cu_seq_k[-1]] int32 rows of KVCache.token_rows holding each sequence's keys
    # [0, seq_len), in order; None when no sequence has a prefix: the keys are the
    # step's own k/v rows [first_token, T).
    gather_rows: np.ndarray | None


@dataclass(frozen=True)
class VarlenMetadata:
    """VarlenPlan on the device, shared by all layers of a step."""

    first_token: int
    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    max_q: int
    max_k: int
    gather_rows: torch.Tensor | None


def cumulative(lengths: Sequence[int]) -> np.ndarray:
    """[n + 1] int32 offsets: 0, l0, l0 + l1, ..."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def gather_rows(seq_lens: Sequence[int], page_table: np.ndarray, page_size: int,
                rows_per_page: int) -> np.ndarray:
    """Row of every key token [0, seq_lens[i]) of every sequence, in order, in a view
    where page p's token o is row p * rows_per_page + o; page_table [n, W] (no loop per
    token)."""
    lengths = np.asarray(seq_lens, dtype=np.int64)
    sequence = np.repeat(np.arange(lengths.shape[0]), lengths)
    token = np.arange(sequence.shape[0], dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    rows = page_table[sequence, token // page_size].astype(np.int64) * rows_per_page + token % page_size
    if rows.size and rows.max() >= 2**31:
        raise ValueError("KV cache too large for int32 gather rows")
    return rows.astype(np.int32)


def worth_varlen(query_lens: Sequence[int], seq_lens: Sequence[int]) -> bool:
    """Whether these prefill sequences should take the varlen call: always when nothing
    is cached (no gather), else when enough queries share each gathered key."""
    if list(query_lens) == list(seq_lens):
        return True
    work = sum(q * s for q, s in zip(query_lens, seq_lens))
    return work >= MIN_QUERIES_PER_GATHERED_KEY * sum(seq_lens)


def plan_varlen(query_lens: Sequence[int], seq_lens: Sequence[int], page_table: np.ndarray,
                page_size: int, rows_per_page: int, first_row: int) -> VarlenPlan:
    """The varlen call for sequences [first_row, B); page_table [B, W] as the Triton
    kernels take it."""
    queries, keys = list(query_lens[first_row:]), list(seq_lens[first_row:])
    cu_q = cumulative(queries)
    whole = queries == keys
    rows = None if whole else gather_rows(keys, page_table[first_row:], page_size, rows_per_page)
    return VarlenPlan(sum(query_lens[:first_row]), cu_q, cu_q if whole else cumulative(keys),
                      max(queries), max(keys), rows)


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMetadata,
                 scale: float) -> torch.Tensor:
    """Causal (bottom-right) attention of packed q [Tq, H, D] over packed k/v [Tk, KV, D]
    -> [Tq, H, D]. Rows may be strided; the last dim must be contiguous."""
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, meta.cu_seq_q, meta.cu_seq_k, meta.max_q, meta.max_k, 0.0, True, False, scale=scale)
    return out[0]


def flash_unavailable(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                      head_dim: int) -> str | None:
    """Why the flash varlen path cannot serve this cache (None: it can, checked by one
    small call shaped like the engine's: q, k, v strided views of one projection)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if dtype not in FLASH_DTYPES:
        return f"dtype {dtype} (flash takes float16/bfloat16)"
    if head_dim % 8 or head_dim > 256:
        return f"head_dim {head_dim} (flash takes multiples of 8 up to 256)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "compute capability below 8.0"
    if not torch.backends.cuda.is_flash_attention_available() or \
            not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return f"torch {torch.__version__} was built without flash attention"
    try:
        _smoke_test(device, dtype, heads, kv_heads, head_dim)
    except Exception as exc:  # noqa: BLE001 - any failure means: use the Triton kernel
        return f"flash varlen call failed: {type(exc).__name__}: {exc}"[:300]
    return None


def _smoke_test(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    """Two sequences, one with a prefix, against an explicit computation."""
    generator = torch.Generator(device=device).manual_seed(0)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(7, width, device=device, dtype=dtype, generator=generator)
    q = qkv[:, :heads * head_dim].view(7, heads, head_dim)[4:]  # sequence 0: 1 query, 2: 2 queries
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(7, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(7, kv_heads, head_dim)
    meta = VarlenMetadata(0, torch.tensor([0, 1, 3], dtype=torch.int32, device=device),
                          torch.tensor([0, 4, 7], dtype=torch.int32, device=device), 2, 4, None)
    out = flash_varlen(q, k, v, meta, head_dim**-0.5).float()
    group = heads // kv_heads
    expected = []
    for rows, keys in ((range(0, 1), range(0, 4)), (range(1, 3), range(4, 7))):
        for i, row in enumerate(rows):
            visible = keys[:len(keys) - len(rows) + i + 1]
            kk = k[visible].float().repeat_interleave(group, dim=1)  # [S, H, D]
            vv = v[visible].float().repeat_interleave(group, dim=1)
            weights = torch.softmax(torch.einsum("hd,shd->hs", q[row].float(), kk) * head_dim**-0.5, dim=-1)
            expected.append(torch.einsum("hs,shd->hd", weights, vv))
    error = (out - torch.stack(expected)).abs().max().item()
    if not error < 5e-2:
        raise RuntimeError(f"flash varlen output differs from the reference by {error:.3g}")
