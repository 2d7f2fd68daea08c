"""The paged KV cache tensor.

Layout is page-major: [num_pages, num_layers, 2 (K, V), page_size, num_kv_heads, head_dim].
One page holds all layers of `page_size` tokens, so a run of adjacent pages is one
contiguous byte range: the transfer layer moves a prompt's KV as a few coalesced runs.
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, num_pages: int, page_size: int,
                 device: str | torch.device, dtype: torch.dtype) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        shape = (num_pages, config.num_layers, 2, page_size, config.num_kv_heads, config.head_dim)
        self.buffer = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def over(cls, buffer: torch.Tensor, page_size: int) -> KVCache:
        """A cache over an existing buffer of the layout above (a tensor-parallel rank's
        shared-memory pages, engine.parallel.launch)."""
        cache = cls.__new__(cls)
        cache.num_pages, cache.page_size, cache.buffer = buffer.shape[0], page_size, buffer
        return cache

    @property
    def page_bytes(self) -> int:
        return self.buffer[0].numel() * self.buffer.element_size()

    @property
    def total_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def layer_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided views [num_pages, page_size, KV, D] of one layer's keys and values."""
        return self.buffer[:, layer, 0], self.buffer[:, layer, 1]

    @property
    def rows_per_page(self) -> int:
        """Rows between one page's first token and the next page's in `token_rows`."""
        return self.buffer[0].numel() // self.buffer.shape[-1] // self.buffer.shape[-2]

    def token_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [R, KV, D] of one layer's keys and values in which token o of page p is
        row p * rows_per_page + o (rows between are other layers' tokens: never index
        them). For gathering tokens of many pages with one index_select."""
        assert self.buffer.is_contiguous()
        k_pages, v_pages = self.layer_views(layer)
        rows = (self.num_pages - 1) * self.rows_per_page + self.page_size
        shape, strides = (rows, *k_pages.shape[2:]), (k_pages.stride(1), *k_pages.stride()[2:])
        return k_pages.as_strided(shape, strides), v_pages.as_strided(shape, strides)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new K/V [T, KV, D] at flat slots (page * page_size + offset)."""
        pages, offsets = slots // self.page_size, slots % self.page_size
        self.buffer[pages, layer, 0, offsets] = k.to(self.buffer.dtype)
        self.buffer[pages, layer, 1, offsets] = v.to(self.buffer.dtype)
