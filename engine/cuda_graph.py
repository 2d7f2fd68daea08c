"""CUDA graphs of the decode forward, captured for a list of batch sizes and a number
of tokens per row T.

T = 1 (plain decode): a batch of one new token per sequence, each sampling, runs in the
smallest captured graph that holds it; rows past the batch are padding (slot < 0: no KV
write; seq_len 0: no attention). Attention takes the split-K decode kernel.

T > 1 (verify steps: each decoding request's last token and up to T - 1 drafts; also a
draft model's catch-up): rows are *ragged*. Row i has n_i <= T new tokens, packed one
after another as an eager step packs them (query_start = cumsum of n_i, in the static
buffer), so a request with fewer drafts than T - 1 (its limit near max_tokens or the
context, or the drafter proposed fewer, or none) keeps exact causal positions
[computed, computed + n_i) and seq_len computed + n_i: nothing about it is padded and no
KV is written past its own tokens. Only the tail of the token buffer (B_pad * T - sum
n_i tokens) and rows past the batch are padding: their slots are -1 (no KV write), their
rows have n = 0 (the ragged prefill kernel, reading keys through pages, skips them), and
their outputs are never read. Padding *inside* a row (positions past its last draft)
was rejected: those positions would lie past the pages the scheduler gave the request,
and a row's seq_len would count tokens that are not its own. Every token that needs
logits is listed in `logits_rows` (all of a verifying request's 1 + drafts positions,
the last token of any other row); the graph gathers them and the step's logits come out
in the order an eager step returns them. T > 1 graphs take no carried tokens (overlap
scheduling never carries into a verify step: the host drafts from tokens it has read).

The graphs read one static int32 device buffer, refilled before each replay by one
non-blocking copy from a pinned host buffer (`GraphInputs`); two host buffers alternate
so the CPU can fill step N+1 while step N's copy may still be queued.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from engine.attention.base import AttentionBackend
from engine.attention.triton_backend import TritonAttention, TritonAttentionMetadata
from engine.batch import Batch
from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.model_runner import CarriedTokens, token_slice
from engine.models.llama import CausalLM

if TYPE_CHECKING:
    from engine.request import Request

# Segments of the static buffer, each max_batch_size long, then the page table (T = 1).
# fill_mask/fill_sources: row i's input is carried_tokens[fill_sources[i]] where fill_mask[i]
# is 1 (overlap scheduling); the graph itself does that selection.
_SEGMENTS = ("input_ids", "positions", "slots", "seq_lens", "fill_mask", "fill_sources")
# T > 1: (name, entries per row, extra entries); per-token segments hold max_batch * T.
_RAGGED_SEGMENTS = (("input_ids", -1, 0), ("positions", -1, 0), ("slots", -1, 0), ("logits_rows", -1, 0),
                    ("seq_lens", 1, 0), ("query_start", 1, 1))
_NO_SOURCES: dict[Request, int] = {}


def _segments(tokens_per_row: int) -> list[tuple[str, int, int]]:
    if tokens_per_row == 1:
        return [(name, 1, 0) for name in _SEGMENTS]
    return [(name, tokens_per_row if per_row < 0 else per_row, extra) for name, per_row, extra in _RAGGED_SEGMENTS]


def buffer_size(max_batch: int, max_pages: int, tokens_per_row: int = 1) -> int:
    return sum(max_batch * per_row + extra for _, per_row, extra in _segments(tokens_per_row)) + max_batch * max_pages


def buffer_views(flat: torch.Tensor, max_batch: int, max_pages: int, batch_size: int,
                 tokens_per_row: int = 1) -> dict[str, torch.Tensor]:
    """The segments of an input buffer laid out for `max_batch` rows, cut to `batch_size`."""
    views, offset = {}, 0
    for name, per_row, extra in _segments(tokens_per_row):
        views[name] = flat[offset:offset + batch_size * per_row + extra]
        offset += max_batch * per_row + extra
    views["page_table"] = flat[offset:].view(max_batch, max_pages)[:batch_size]
    return views


class Filled(NamedTuple):
    """What `GraphInputs.fill` wrote: rows whose input comes from carried device tokens,
    and how many logits rows the step returns."""

    carried_rows: int
    logits_rows: int


class GraphInputs:
    """Host staging of the graphs' inputs: two int32 buffers with the static buffer's
    layout (pinned when the graphs run on CUDA), filled for a batch in one pass.

    Page-table rows are written incrementally. Per buffer and row we keep the page list
    last written there and how many of its entries; the scheduler only appends to a
    request's `pages` while it is the same list object (it replaces the list when it
    releases or re-matches pages), so for the same list only new entries are written.
    Entries past a row's ceil(seq_len / page_size) are stale and never read."""

    def __init__(self, max_batch: int, max_pages: int, page_size: int, pin_memory: bool,
                 tokens_per_row: int = 1) -> None:
        self.max_batch, self.max_pages, self.page_size = max_batch, max_pages, page_size
        self.tokens_per_row = tokens_per_row
        size = buffer_size(max_batch, max_pages, tokens_per_row)
        self.buffers = [torch.zeros(size, dtype=torch.int32, pin_memory=pin_memory) for _ in range(2)]
        self.arrays = [{k: v.numpy() for k, v in
                        buffer_views(b, max_batch, max_pages, max_batch, tokens_per_row).items()}
                       for b in self.buffers]
        # Per buffer and row: (the page list written there, entries written).
        self.written_pages: list[list[tuple[list[int], int] | None]] = [[None] * max_batch for _ in range(2)]

    def fill(self, turn: int, batch: Batch, carried: CarriedTokens | None) -> Filled:
        """Write the batch's rows (and padding up to max_batch) into buffer `turn`."""
        if self.tokens_per_row > 1:
            return self._fill_ragged(turn, batch)
        return Filled(self._fill_decode(turn, batch, carried), len(batch.scheduled))

    def _write_pages(self, turn: int, row: int, pages: list[int], count: int) -> None:
        """Page-table row `row` of buffer `turn` holds pages[:count] afterwards."""
        written = self.written_pages[turn]
        previous = written[row]
        done = previous[1] if previous is not None and previous[0] is pages and previous[1] <= count else 0
        if done < count:
            self.arrays[turn]["page_table"][row, done:count] = pages[done:count]
            written[row] = (pages, count)

    def _fill_decode(self, turn: int, batch: Batch, carried: CarriedTokens | None) -> int:
        """One token per row; returns how many input rows come from carried device tokens."""
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

    def _fill_ragged(self, turn: int, batch: Batch) -> Filled:
        """Up to T tokens per row, packed (see the module docstring); no carried tokens."""
        arrays, page_size = self.arrays[turn], self.page_size
        ids: list[int] = []
        starts: list[int] = []
        counts: list[int] = []
        logits_rows: list[int] = []
        for row, item in enumerate(batch.scheduled):
            request, count, drafts = item.request, item.num_new_tokens, item.num_draft_tokens
            start = request.num_computed_tokens
            first = len(ids)
            ids.extend(token_slice(request, start, start + count - drafts))
            if drafts:  # exactly `drafts` of them (the scheduler's cut); every position gets logits
                ids.extend(request.draft_token_ids)
                logits_rows.extend(range(first + count - 1 - drafts, first + count))
            else:
                logits_rows.append(first + count - 1)
            starts.append(start)
            counts.append(count)
            self._write_pages(turn, row, request.pages, -(-(start + count) // page_size))
        rows, tokens = len(counts), len(ids)
        starts_array = np.asarray(starts, dtype=np.int64)
        counts_array = np.asarray(counts, dtype=np.int64)
        ends = np.cumsum(counts_array)
        # Each token's position: its row's start plus its index within the row.
        positions = np.arange(tokens, dtype=np.int64) + np.repeat(starts_array - (ends - counts_array), counts_array)
        table = arrays["page_table"]
        row_of_token = np.repeat(np.arange(rows), counts_array)
        slots = table[row_of_token, positions // page_size].astype(np.int64) * page_size + positions % page_size
        arrays["input_ids"][:tokens] = ids
        arrays["input_ids"][tokens:] = 0
        arrays["positions"][:tokens] = positions
        arrays["positions"][tokens:] = 0
        arrays["slots"][:tokens] = slots
        arrays["slots"][tokens:] = -1
        arrays["logits_rows"][:len(logits_rows)] = logits_rows
        arrays["logits_rows"][len(logits_rows):] = 0
        arrays["seq_lens"][:rows] = starts_array + counts_array
        arrays["seq_lens"][rows:] = 0
        arrays["query_start"][0] = 0
        arrays["query_start"][1:rows + 1] = ends
        arrays["query_start"][rows + 1:] = tokens  # padding rows: no new tokens
        return Filled(0, len(logits_rows))


class DecodeGraphs:
    """One captured graph per batch size, for batches of up to `tokens_per_row` new
    tokens per sequence (see the module docstring)."""

    def __init__(self, model: CausalLM, attention: TritonAttention, batch_sizes: list[int],
                 max_model_len: int, max_carried: int, tokens_per_row: int = 1,
                 pool: tuple[int, int] | None = None) -> None:
        self.model, self.attention = model, attention
        self._init_buffers(attention.kv_cache.page_size, batch_sizes, max_model_len, max_carried,
                           attention.kv_cache.buffer.device, tokens_per_row)
        self.copied = [torch.cuda.Event() for _ in range(2)]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture_all(pool if pool is not None else torch.cuda.graph_pool_handle())

    def _init_buffers(self, page_size: int, batch_sizes: list[int], max_model_len: int, max_carried: int,
                      device: torch.device, tokens_per_row: int = 1) -> None:
        """Everything but the graphs and events (a benchmark builds these on the CPU)."""
        self.page_size = page_size
        self.tokens_per_row = tokens_per_row
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.max_pages = -(-max_model_len // page_size)
        self.static = torch.zeros(buffer_size(self.max_batch, self.max_pages, tokens_per_row), dtype=torch.int32,
                                  device=device)
        self.static_views = self._views(self.static, self.max_batch)
        self.static_views["slots"].fill_(-1)
        self.carried_tokens = torch.zeros(max(max_carried, self.max_batch), dtype=torch.long, device=device)
        self.inputs = GraphInputs(self.max_batch, self.max_pages, page_size, pin_memory=device.type == "cuda",
                                  tokens_per_row=tokens_per_row)
        self.turn = 0
        self.replays = 0  # graph replays so far (tests and benchmarks check graphs ran)
        # The smallest captured size holding a batch of n rows, for n up to max_batch.
        self.size_for = [next(b for b in self.batch_sizes if b >= n) for n in range(self.max_batch + 1)]

    @staticmethod
    def build(config: EngineConfig, model: CausalLM, attention: AttentionBackend, tokens_per_row: int = 1,
              pool: tuple[int, int] | None = None) -> DecodeGraphs:
        if not isinstance(attention, TritonAttention) or attention.kv_cache.buffer.device.type != "cuda":
            raise ConfigError("cuda_graphs needs device 'cuda' and attention_backend 'triton'")
        sizes = [b for b in config.cuda_graph_batch_sizes if b <= config.max_num_seqs] or [config.max_num_seqs]
        assert config.max_model_len is not None
        return DecodeGraphs(model, attention, sizes, config.max_model_len, config.max_num_seqs, tokens_per_row, pool)

    def _views(self, flat: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        return buffer_views(flat, self.max_batch, self.max_pages, batch_size, self.tokens_per_row)

    def _static_batch(self, batch_size: int) -> Batch:
        views = self._views(self.static, batch_size)
        batch = Batch([])
        batch.positions, batch.slot_mapping = views["positions"], views["slots"]
        if self.tokens_per_row == 1:
            metadata = TritonAttentionMetadata(
                views["page_table"], views["seq_lens"], views["seq_lens"], 1,
                self.attention.num_splits(batch_size, self.max_pages * self.page_size))
        else:  # max_query_len T > 1: the ragged prefill kernel, over query_start
            metadata = TritonAttentionMetadata(views["page_table"], views["seq_lens"], views["query_start"],
                                               self.tokens_per_row, 1)
        batch.attention_metadata = metadata
        return batch

    def _forward(self, batch: Batch, batch_size: int) -> torch.Tensor:
        views = self._views(self.static, batch_size)
        if self.tokens_per_row > 1:
            batch.input_ids = views["input_ids"]
            hidden = self.model(batch, self.attention)
            return self.model.compute_logits(hidden.index_select(0, views["logits_rows"]))
        carried = self.carried_tokens[views["fill_sources"]].to(torch.int32)
        batch.input_ids = torch.where(views["fill_mask"] != 0, carried, views["input_ids"])
        return self.model.compute_logits(self.model(batch, self.attention))

    @torch.inference_mode()
    def _capture_all(self, pool: tuple[int, int]) -> None:
        for size in reversed(self.batch_sizes):  # largest first: the others reuse its pool
            batch = self._static_batch(size)
            self._forward(batch, size)  # compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(batch, size)
            self.graphs[size] = (graph, logits)

    def can_run(self, batch: Batch, carried: CarriedTokens | None = None) -> bool:
        """Whether the batch fits these graphs: every sequence samples, computes 1 (T = 1)
        or 1..T new tokens, none of them image positions, within the page-table width;
        with T > 1 no input comes from carried tokens."""
        if not 0 < len(batch.scheduled) <= self.max_batch:
            return False
        limit, most = self.max_pages * self.page_size, self.tokens_per_row
        sources = carried.source_rows if carried is not None and most > 1 else _NO_SOURCES
        for item in batch.scheduled:
            request, count = item.request, item.num_new_tokens
            computed = request.num_computed_tokens
            if not (count == 1 if most == 1 else 0 < count <= most) or not item.completes_prompt \
                    or computed + count > limit \
                    or computed < request.images_end or request in sources:  # images: not a decode step
                return False
        return True

    def _replay(self, batch_size: int) -> torch.Tensor:
        graph, logits = self.graphs[batch_size]
        graph.replay()
        return logits

    def run(self, batch: Batch, carried: CarriedTokens | None = None) -> torch.Tensor:
        """Logits, one row per position an eager step returns (one per sequence for T =
        1); valid until the next replay of a graph of this pool."""
        count = len(batch.scheduled)
        turn = self.turn
        self.copied[turn].synchronize()  # its copy was queued two steps ago
        filled = self.inputs.fill(turn, batch, carried)
        self.static.copy_(self.inputs.buffers[turn], non_blocking=True)
        self.copied[turn].record()
        self.turn ^= 1
        if filled.carried_rows:
            assert carried is not None
            self.carried_tokens[:carried.tokens.shape[0]].copy_(carried.tokens)
        logits = self._replay(self.size_for[count])
        self.replays += 1
        return logits[:filled.logits_rows]
