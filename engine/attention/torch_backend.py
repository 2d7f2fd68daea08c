"""The reference attention backend: plain torch, one sequence at a time; CPU and GPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, register_attention_backend
from engine.batch import Batch


@register_attention_backend
class TorchAttention(AttentionBackend):
    name = "torch"

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        self.kv_cache.write(layer, batch.slot_mapping, k, v)
        k_pages, v_pages = self.kv_cache.layer_views(layer)  # [P, page, KV, D]
        out = torch.empty_like(q)
        start = 0
        for query_len, seq_len, pages in zip(batch.query_lens, batch.seq_lens, batch.page_tables):
            keys = k_pages[pages].flatten(0, 1)[:seq_len]  # [S, KV, D]
            values = v_pages[pages].flatten(0, 1)[:seq_len]
            out[start:start + query_len] = self._attend(q[start:start + query_len], keys, values)
            start += query_len
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        query_len, seq_len = q.shape[0], k.shape[0]
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        # Query i sits at position seq_len - query_len + i and sees keys up to it.
        rows = torch.arange(query_len, device=q.device)[:, None] + (seq_len - query_len)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=self.scale
        )
        return out.transpose(0, 1)
