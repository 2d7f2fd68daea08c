"""CUDA graphs of the decode forward, captured for a list of batch sizes.

A decode batch (one new token per sequence, each sampling) runs in the smallest captured
graph that holds it; rows past the batch are padding (slot < 0: no KV write; seq_len 0:
no attention). The graphs read one static int32 device buffer, refilled before each
replay by one non-blocking copy from a pinned host buffer (`GraphInputs`); two host
buffers alternate so the CPU can fill step N+1 while step N's copy may still be queued.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.attention.base import AttentionBackend
from engine.attention.triton_backend import TritonAttention, TritonAttentionMetadata
from engine.batch import Batch
from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.model_runner import CarriedTokens
from engine.models.llama import CausalLM

if TYPE_CHECKING:
    from engine.request import Request

# Segments of the static buffer, each max_batch_size long, then the page table.
# fill_mask/fill_sources: row i's input is carried_tokens[fill_sources[i]] where fill_mask[i]
# is 1 (overlap scheduling); the graph itself does that selection.
_SEGMENTS = ("input_ids", "positions", "slots", "seq_lens", "fill_mask", "fill_sources")
_NO_SOURCES: dict[Request, int] = {}


def buffer_size(max_batch: int, max_pages: int) -> int:
    return max_batch * (len(_SEGMENTS) + max_pages)


def buffer_views(flat: torch.Tensor, max_batch: int, max_pages: int, batch_size: int) -> dict[str, torch.Tensor]:
    """The segments of an input buffer laid out for `max_batch` rows, cut to `batch_size`."""
    n = max_batch
    views = {name: flat[i * n:i * n + batch_size] for i, name in enumerate(_SEGMENTS)}
    views["page_table"] = flat[len(_SEGMENTS) * n:].view(n, max_pages)[:batch_size]
    return views


class GraphInputs:
    """Host staging of the graphs' inputs: two int32 buffers with the static buffer's
    layout (pinned when the graphs run on CUDA), filled for a batch in one pass.

    Page-table rows are written incrementally. Per buffer and row we keep the page list
    last written there and how many of its entries; the scheduler only appends to a
    request's `pages` while it is the same list object (it replaces the list when it
    releases or re-matches pages), so for the same list only new entries are written.
    Entries past a row's ceil(seq_len / page_size) are stale and never read."""

    def __init__(self, max_batch: int, max_pages: int, page_size: int, pin_memory: bool) -> None:
        self.max_batch, self.max_pages, self.page_size = max_batch, max_pages, page_size
        size = buffer_size(max_batch, max_pages)
        self.buffers = [torch.zeros(size, dtype=torch.int32, pin_memory=pin_memory) for _ in range(2)]
        self.arrays = [{k: v.numpy() for k, v in buffer_views(b, max_batch, max_pages, max_batch).items()}
                       for b in self.buffers]
        # Per buffer and row: (the page list written there, entries written).
        self.written_pages: list[list[tuple[list[int], int] | None]] = [[None] * max_batch for _ in range(2)]

    def fill(self, turn: int, batch: Batch, carried: CarriedTokens | None) -> int:
        """Write the batch's rows (and padding up to max_batch) into buffer `turn`;
        returns how many input rows come from carried device tokens."""
        arrays, written, page_size = self.arrays[turn], self.written_pages[turn], self.page_size
        table, rows = arrays["page_table"], len(batch.scheduled)
        get_source = (carried.source_rows if carried is not None else _NO_SOURCES).get
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sources: list[int] = []  # -1: not carried
        add_id, add_position, add_slot, add_source = ids.append, positions.append, slots.append, sources.append
        fills = 0
        for row, item in enumerate(batch.scheduled):
            request = item.request
            position, pages = request.num_computed_tokens, request.pages
            index = position // page_size
            add_position(position)
            add_slot(pages[index] * page_size + position - index * page_size)
            source = get_source(request, -1)
            add_source(source)
            if source < 0:
                prompt = request.prompt_token_ids
                add_id(prompt[position] if position < len(prompt)
                       else request.output_token_ids[position - len(prompt)])
            else:  # the graph takes the carried token; the placeholder here is never read
                add_id(0)
                fills += 1
            count, previous = index + 1, written[row]
            done = previous[1] if previous is not None and previous[0] is pages and previous[1] <= count else 0
            if done < count:
                table[row, done:count] = pages[done:count]
                written[row] = (pages, count)
        arrays["input_ids"][:rows] = ids
        arrays["positions"][:rows] = positions
        np.add(arrays["positions"][:rows], 1, out=arrays["seq_lens"][:rows])
        arrays["slots"][:rows] = slots
        arrays["slots"][rows:] = -1
        arrays["seq_lens"][rows:] = 0
        # Mask = source >= 0; a row not carried reads source 0 (masked out).
        arrays["fill_sources"][:rows] = sources
        np.greater_equal(arrays["fill_sources"][:rows], 0, out=arrays["fill_mask"][:rows], casting="unsafe")
        arrays["fill_mask"][rows:] = 0
        np.maximum(arrays["fill_sources"][:rows], 0, out=arrays["fill_sources"][:rows])
        return fills


class DecodeGraphs:
    def __init__(self, model: CausalLM, attention: TritonAttention, batch_sizes: list[int],
                 max_model_len: int, max_carried: int) -> None:
        self.model, self.attention = model, attention
        self._init_buffers(attention.kv_cache.page_size, batch_sizes, max_model_len, max_carried,
                           attention.kv_cache.buffer.device)
        self.copied = [torch.cuda.Event() for _ in range(2)]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture_all()

    def _init_buffers(self, page_size: int, batch_sizes: list[int], max_model_len: int, max_carried: int,
                      device: torch.device) -> None:
        """Everything but the graphs and events (a benchmark builds these on the CPU)."""
        self.page_size = page_size
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.max_pages = -(-max_model_len // page_size)
        self.static = torch.zeros(buffer_size(self.max_batch, self.max_pages), dtype=torch.int32, device=device)
        self.static_views = self._views(self.static, self.max_batch)
        self.static_views["slots"].fill_(-1)
        self.carried_tokens = torch.zeros(max(max_carried, self.max_batch), dtype=torch.long, device=device)
        self.inputs = GraphInputs(self.max_batch, self.max_pages, page_size, pin_memory=device.type == "cuda")
        self.turn = 0
        # The smallest captured size holding a batch of n rows, for n up to max_batch.
        self.size_for = [next(b for b in self.batch_sizes if b >= n) for n in range(self.max_batch + 1)]

    @staticmethod
    def build(config: EngineConfig, model: CausalLM, attention: AttentionBackend) -> DecodeGraphs:
        if not isinstance(attention, TritonAttention) or attention.kv_cache.buffer.device.type != "cuda":
            raise ConfigError("cuda_graphs needs device 'cuda' and attention_backend 'triton'")
        sizes = [b for b in config.cuda_graph_batch_sizes if b <= config.max_num_seqs] or [config.max_num_seqs]
        assert config.max_model_len is not None
        return DecodeGraphs(model, attention, sizes, config.max_model_len, config.max_num_seqs)

    def _views(self, flat: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        return buffer_views(flat, self.max_batch, self.max_pages, batch_size)

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
        if not 0 < len(batch.scheduled) <= self.max_batch:
            return False
        limit = self.max_pages * self.page_size
        for item in batch.scheduled:
            computed = item.request.num_computed_tokens
            if item.num_new_tokens != 1 or not item.completes_prompt or computed >= limit \
                    or computed < item.request.images_end:  # an image position: not a decode step
                return False
        return True

    def run(self, batch: Batch, carried: CarriedTokens | None = None) -> torch.Tensor:
        """Logits [len(batch), vocab]; valid until the next replay of the same graph."""
        count = len(batch.scheduled)
        turn = self.turn
        self.copied[turn].synchronize()  # its copy was queued two steps ago
        fills = self.inputs.fill(turn, batch, carried)
        self.static.copy_(self.inputs.buffers[turn], non_blocking=True)
        self.copied[turn].record()
        self.turn ^= 1
        if fills:
            assert carried is not None
            self.carried_tokens[:carried.tokens.shape[0]].copy_(carried.tokens)
        graph, logits = self.graphs[self.size_for[count]]
        graph.replay()
        return logits[:count]
