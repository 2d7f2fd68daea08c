"""CUDA graphs of the decode forward, captured for a list of batch sizes.

A decode batch (one new token per sequence, each sampling) runs in the smallest captured
graph that holds it; rows past the batch are padding (slot < 0: no KV write; seq_len 0:
no attention). The graphs read one static int32 device buffer, refilled before each
replay by one non-blocking copy from a pinned host buffer; two host buffers alternate
so the CPU can fill step N+1 while step N's copy may still be queued.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.attention.base import AttentionBackend
from engine.attention.triton_backend import TritonAttention, TritonAttentionMetadata
from engine.batch import Batch
from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.model_runner import CarriedTokens, token_at
from engine.models.llama import CausalLM

# Segments of the static buffer, each max_batch_size long, then the page table.
_SEGMENTS = ("input_ids", "positions", "slots", "seq_lens", "fill_rows", "fill_sources")


class DecodeGraphs:
    def __init__(self, model: CausalLM, attention: TritonAttention, batch_sizes: list[int],
                 max_model_len: int) -> None:
        self.model, self.attention = model, attention
        self.page_size = attention.kv_cache.page_size
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.max_pages = -(-max_model_len // self.page_size)
        device = attention.kv_cache.buffer.device
        size = self.max_batch * (len(_SEGMENTS) + self.max_pages)
        self.static = torch.zeros(size, dtype=torch.int32, device=device)
        self.hosts = [torch.zeros(size, dtype=torch.int32).pin_memory() for _ in range(2)]
        self.copied = [torch.cuda.Event() for _ in range(2)]
        self.turn = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._clear_host(self.static)
        self._capture_all()

    @staticmethod
    def build(config: EngineConfig, model: CausalLM, attention: AttentionBackend) -> DecodeGraphs:
        if not isinstance(attention, TritonAttention) or attention.kv_cache.buffer.device.type != "cuda":
            raise ConfigError("cuda_graphs needs device 'cuda' and attention_backend 'triton'")
        sizes = [b for b in config.cuda_graph_batch_sizes if b <= config.max_num_seqs] or [config.max_num_seqs]
        assert config.max_model_len is not None
        return DecodeGraphs(model, attention, sizes, config.max_model_len)

    def _views(self, flat: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        n = self.max_batch
        views = {name: flat[i * n:i * n + batch_size] for i, name in enumerate(_SEGMENTS)}
        views["page_table"] = flat[len(_SEGMENTS) * n:].view(n, self.max_pages)[:batch_size]
        return views

    def _clear_host(self, flat: torch.Tensor) -> None:
        views = self._views(flat, self.max_batch)
        views["slots"].fill_(-1)
        views["seq_lens"].fill_(0)

    def _static_batch(self, batch_size: int) -> Batch:
        views = self._views(self.static, batch_size)
        batch = Batch([])
        batch.input_ids, batch.positions, batch.slot_mapping = views["input_ids"], views["positions"], views["slots"]
        batch.attention_metadata = TritonAttentionMetadata(
            views["page_table"], views["seq_lens"], views["seq_lens"], 1,
            self.attention.num_splits(batch_size, self.max_pages * self.page_size))
        return batch

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):  # largest first: the others reuse its pool
            batch = self._static_batch(size)
            self.model.compute_logits(self.model(batch, self.attention))  # compiles kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.compute_logits(self.model(batch, self.attention))
            self.graphs[size] = (graph, logits)

    def can_run(self, batch: Batch) -> bool:
        limit = self.max_pages * self.page_size
        return 0 < len(batch.scheduled) <= self.max_batch and all(
            item.num_new_tokens == 1 and item.completes_prompt and item.request.num_computed_tokens < limit
            for item in batch.scheduled)

    def run(self, batch: Batch, carried: CarriedTokens | None = None) -> torch.Tensor:
        """Logits [len(batch), vocab]; valid until the next replay of the same graph."""
        count = len(batch.scheduled)
        size = next(b for b in self.batch_sizes if b >= count)
        host = self.hosts[self.turn]
        self.copied[self.turn].synchronize()  # its copy was queued two steps ago
        fills = self._fill_host(host, batch, carried)
        self.static.copy_(host, non_blocking=True)
        self.copied[self.turn].record()
        self.turn ^= 1
        if fills:
            assert carried is not None
            static = self._views(self.static, self.max_batch)
            rows, sources = static["fill_rows"][:fills], static["fill_sources"][:fills]
            static["input_ids"][rows] = carried.tokens[sources].to(torch.int32)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:count]

    def _fill_host(self, flat: torch.Tensor, batch: Batch, carried: CarriedTokens | None) -> int:
        """Write the batch's rows (and padding up to the largest graph) into a host buffer;
        returns how many input rows come from carried device tokens."""
        views = {name: view.numpy() for name, view in self._views(flat, self.max_batch).items()}
        rows = len(batch.scheduled)
        fills = 0
        for row, item in enumerate(batch.scheduled):
            request, position = item.request, item.request.num_computed_tokens
            page_count = position // self.page_size + 1
            views["input_ids"][row] = token_at(request, position)
            views["positions"][row] = position
            views["slots"][row] = request.pages[position // self.page_size] * self.page_size + position % self.page_size
            views["seq_lens"][row] = position + 1
            views["page_table"][row, :page_count] = request.pages[:page_count]
            if carried is not None and request in carried.source_rows:
                views["fill_rows"][fills], views["fill_sources"][fills] = row, carried.source_rows[request]
                fills += 1
        views["slots"][rows:] = -1
        views["seq_lens"][rows:] = 0
        return fills
