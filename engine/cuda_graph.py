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
# fill_mask/fill_sources: row i's input is carried_tokens[fill_sources[i]] where fill_mask[i]
# is 1 (overlap scheduling); the graph itself does that selection.
_SEGMENTS = ("input_ids", "positions", "slots", "seq_lens", "fill_mask", "fill_sources")


class DecodeGraphs:
    def __init__(self, model: CausalLM, attention: TritonAttention, batch_sizes: list[int],
                 max_model_len: int, max_carried: int) -> None:
        self.model, self.attention = model, attention
        self.page_size = attention.kv_cache.page_size
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.max_pages = -(-max_model_len // self.page_size)
        device = attention.kv_cache.buffer.device
        size = self.max_batch * (len(_SEGMENTS) + self.max_pages)
        self.static = torch.zeros(size, dtype=torch.int32, device=device)
        self.static_views = self._views(self.static, self.max_batch)
        self.carried_tokens = torch.zeros(max(max_carried, self.max_batch), dtype=torch.long, device=device)
        self.hosts = [torch.zeros(size, dtype=torch.int32).pin_memory() for _ in range(2)]
        self._init_host_views()
        self.copied = [torch.cuda.Event() for _ in range(2)]
        self.turn = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.static_views["slots"].fill_(-1)
        self._capture_all()

    def _init_host_views(self) -> None:
        self.host_views = [{k: v.numpy() for k, v in self._views(h, self.max_batch).items()} for h in self.hosts]
        # Per host buffer and row: (the request's page list, entries already written).
        # Page lists only grow while the same list object (the scheduler replaces the
        # list when it releases pages), so only new entries need writing.
        self.written_pages: list[list[tuple[list[int], int] | None]] = [[None] * self.max_batch for _ in self.hosts]

    @staticmethod
    def build(config: EngineConfig, model: CausalLM, attention: AttentionBackend) -> DecodeGraphs:
        if not isinstance(attention, TritonAttention) or attention.kv_cache.buffer.device.type != "cuda":
            raise ConfigError("cuda_graphs needs device 'cuda' and attention_backend 'triton'")
        sizes = [b for b in config.cuda_graph_batch_sizes if b <= config.max_num_seqs] or [config.max_num_seqs]
        assert config.max_model_len is not None
        return DecodeGraphs(model, attention, sizes, config.max_model_len, config.max_num_seqs)

    def _views(self, flat: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        n = self.max_batch
        views = {name: flat[i * n:i * n + batch_size] for i, name in enumerate(_SEGMENTS)}
        views["page_table"] = flat[len(_SEGMENTS) * n:].view(n, self.max_pages)[:batch_size]
        return views

    def _static_batch(self, batch_size: int) -> Batch:
        views = self._views(self.static, batch_size)
        batch = Batch([])
        batch.positions, batch.slot_mapping = views["positions"], views["slots"]
        batch.attention_metadata = TritonAttentionMetadata(
            views["page_table"], views["seq_lens"], views["seq_lens"], 1,
            self.attention.num_splits(batch_size, self.max_pages * self.page_size))
        return batch

    def _forward(self, batch: Batch, batch_size: int) -> torch.Tensor:
        views = self._views(self.static, batch_size)
        carried = self.carried_tokens[views["fill_sources"]].to(torch.int32)
        batch.input_ids = torch.where(views["fill_mask"] != 0, carried, views["input_ids"])
        return self.model.compute_logits(self.model(batch, self.attention))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):  # largest first: the others reuse its pool
            batch = self._static_batch(size)
            self._forward(batch, size)  # compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(batch, size)
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
        turn = self.turn
        self.copied[turn].synchronize()  # its copy was queued two steps ago
        fills = self._fill_host(turn, batch, carried)
        self.static.copy_(self.hosts[turn], non_blocking=True)
        self.copied[turn].record()
        self.turn ^= 1
        if fills:
            assert carried is not None
            self.carried_tokens[:carried.tokens.shape[0]].copy_(carried.tokens)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:count]

    def _fill_host(self, turn: int, batch: Batch, carried: CarriedTokens | None) -> int:
        """Write the batch's rows (and padding up to the largest graph) into host buffer
        `turn`; returns how many input rows come from carried device tokens."""
        views, written = self.host_views[turn], self.written_pages[turn]
        page_size, rows = self.page_size, len(batch.scheduled)
        requests = [item.request for item in batch.scheduled]
        positions = [r.num_computed_tokens for r in requests]
        views["input_ids"][:rows] = [token_at(r, p) for r, p in zip(requests, positions)]
        views["positions"][:rows] = positions
        views["slots"][:rows] = [r.pages[p // page_size] * page_size + p % page_size
                                 for r, p in zip(requests, positions)]
        views["seq_lens"][:rows] = [p + 1 for p in positions]
        views["slots"][rows:] = -1
        views["seq_lens"][rows:] = 0
        table = views["page_table"]
        for row, (request, position) in enumerate(zip(requests, positions)):
            count, pages, previous = position // page_size + 1, request.pages, written[row]
            done = previous[1] if previous is not None and previous[0] is pages and previous[1] <= count else 0
            if done < count:
                table[row, done:count] = pages[done:count]
                written[row] = (pages, count)
        sources = carried.source_rows if carried is not None else {}
        mask = [r in sources for r in requests]
        views["fill_mask"][:rows] = mask
        views["fill_mask"][rows:] = 0
        if any(mask):
            views["fill_sources"][:rows] = [sources.get(r, 0) for r in requests]
        return sum(mask)
