"""Fills a Batch's tensors from the scheduled requests and runs the model on them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from engine.attention.base import AttentionBackend
from engine.batch import Batch
from engine.models.llama import CausalLM

if TYPE_CHECKING:
    from engine.cuda_graph import DecodeGraphs
    from engine.request import Request


class CarriedTokens(NamedTuple):
    """Input tokens that are still only on the device: the previous step sampled them and
    the host has not read them yet (overlap scheduling). A request listed here has a
    placeholder as its last token; its input row is filled from `tokens[source_rows[r]]`."""

    source_rows: dict[Request, int]
    tokens: torch.Tensor  # [N] long, the previous step's sampled token ids


_NO_SOURCES: dict[Request, int] = {}


def token_at(request: Request, index: int) -> int:
    """request.all_token_ids[index] without building the whole list."""
    prompt = request.prompt_token_ids
    return prompt[index] if index < len(prompt) else request.output_token_ids[index - len(prompt)]


def token_slice(request: Request, start: int, end: int) -> list[int]:
    """request.all_token_ids[start:end] without building the whole list."""
    prompt, outputs = request.prompt_token_ids, request.output_token_ids
    if end <= len(prompt):
        return prompt[start:end]
    if start >= len(prompt):
        return outputs[start - len(prompt):end - len(prompt)]
    return prompt[start:] + outputs[:end - len(prompt)]


def _image_parts(request: Request, start: int, end: int, first_row: int,
                 rows: list[int], embeds: list[torch.Tensor]) -> None:
    """Add the batch rows and embedding slices of `request`'s image positions among its
    tokens [start, end), which occupy the batch from row `first_row`."""
    for image in request.images:
        low, high = max(start, image.offset), min(end, image.end)
        if low >= high:
            continue
        if image.embedding is None:
            raise RuntimeError(f"request {request.request_id}: an image reached the model unencoded")
        rows.extend(range(first_row + low - start, first_row + high - start))
        embeds.append(image.embedding[low - image.offset:high - image.offset])


@dataclass(slots=True)
class _Row:
    pages: list[int]  # the request's page list this row copies (held: its id stays unique)
    array: np.ndarray  # int64; the first `count` entries are pages[:count]
    count: int


class PageRows:
    """Host int64 copies of requests' page lists, each grown in place as its list grows,
    so a step copies only new page ids rather than every page of every request.

    Valid because the scheduler only appends to a request's `pages` while it is the same
    list object and replaces the list (never edits it) when it releases or re-matches
    pages: a copy taken from the same list object is a prefix of it."""

    def __init__(self) -> None:
        self._rows: dict[Request, _Row] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, request: Request, count: int) -> np.ndarray:
        """request.pages[:count] (a view, valid until the next call for this request)."""
        pages = request.pages
        row = self._rows.get(request)
        if row is None or row.pages is not pages:
            row = self._rows[request] = _Row(pages, np.empty(max(2 * count, 16), dtype=np.int64), 0)
        if row.count < count:
            if count > row.array.shape[0]:
                grown = np.empty(2 * count, dtype=np.int64)
                grown[:row.count] = row.array[:row.count]
                row.array = grown
            row.array[row.count:count] = pages[row.count:count]
            row.count = count
        return row.array[:count]

    def drop_stale(self) -> None:
        """Forget finished requests and copies of lists their request no longer holds."""
        self._rows = {r: row for r, row in self._rows.items() if not r.finished and row.pages is r.pages}


class ModelRunner:
    def __init__(self, model: CausalLM, attention: AttentionBackend, device: torch.device,
                 graphs: DecodeGraphs | None = None, verify_graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.attention = attention
        self.device = device
        self.page_size = attention.kv_cache.page_size
        # CUDA graphs, when enabled: `graphs` for decode batches (one token per row),
        # `verify_graphs` for batches of up to T > 1 tokens per row (speculation's verify
        # steps; a draft model's catch-up). A batch takes the first that holds it.
        self.graphs = graphs
        self.verify_graphs = verify_graphs
        self.page_rows = PageRows()

    def prepare(self, batch: Batch, carried: CarriedTokens | None = None) -> None:
        page_size, page_rows = self.page_size, self.page_rows
        sources = carried.source_rows if carried is not None else _NO_SOURCES
        ids: list[int] = []
        starts: list[int] = []
        rows: list[np.ndarray] = []
        logits_indices: list[int] = []
        fill_rows: list[int] = []
        fill_sources: list[int] = []
        image_rows: list[int] = []
        image_embeds: list[torch.Tensor] = []
        for item in batch.scheduled:
            request, count = item.request, item.num_new_tokens
            start = request.num_computed_tokens
            end = start + count
            if start < request.images_end:
                _image_parts(request, start, end, len(ids), image_rows, image_embeds)
            drafts = item.num_draft_tokens
            ids.extend(token_slice(request, start, end - drafts))
            if drafts:
                ids.extend(request.draft_token_ids)  # exactly `drafts` of them (the scheduler's cut)
            starts.append(start)
            batch.query_lens.append(count)
            batch.seq_lens.append(end)
            rows.append(page_rows.get(request, -(-end // page_size)))
            source = sources.get(request)
            if source is not None:  # the placeholder is the last known token: no drafts follow it
                fill_rows.append(len(ids) - 1 - drafts)
                fill_sources.append(source)
            if drafts:
                logits_indices.extend(range(len(ids) - 1 - drafts, len(ids)))
            elif item.completes_prompt:
                logits_indices.append(len(ids) - 1)
        if len(page_rows) > 2 * len(rows) + 32:
            page_rows.drop_stale()
        positions, slots, pages = self._positions_and_slots(batch.query_lens, starts, rows)
        # One host-to-device copy for everything (pinned and non-blocking on CUDA).
        parts = [np.asarray(ids, dtype=np.int64), positions, slots, np.asarray(logits_indices, dtype=np.int64),
                 pages, np.asarray(fill_rows, dtype=np.int64), np.asarray(fill_sources, dtype=np.int64)]
        flat = torch.from_numpy(np.concatenate(parts))
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        views = flat.split([part.shape[0] for part in parts])
        batch.input_ids, batch.positions, batch.slot_mapping, batch.logits_indices = views[:4]
        batch.page_tables = list(views[4].split([row.shape[0] for row in rows]))
        if fill_rows:
            assert carried is not None
            batch.input_ids[views[5]] = carried.tokens[views[6]]
        if image_rows:
            batch.image_rows = torch.tensor(image_rows, dtype=torch.long).to(self.device, non_blocking=True)
            embeds = torch.cat(image_embeds) if len(image_embeds) > 1 else image_embeds[0]
            batch.image_embeds = embeds.to(self.device, non_blocking=True)

    def _positions_and_slots(self, query_lens: list[int], starts: list[int],
                             rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions [T], KV slots [T], the page rows concatenated) for sequences whose
        new tokens start at `starts` and whose pages are `rows`, without a loop per token."""
        page_size = self.page_size
        counts = np.asarray(query_lens, dtype=np.int64)
        sequence = np.repeat(np.arange(counts.shape[0]), counts)  # [T] each token's sequence
        first_token = np.cumsum(counts) - counts
        positions = np.arange(sequence.shape[0], dtype=np.int64) + (np.asarray(starts, dtype=np.int64)
                                                                    - first_token)[sequence]
        pages = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        lengths = np.fromiter((row.shape[0] for row in rows), dtype=np.int64, count=len(rows))
        first_page = np.cumsum(lengths) - lengths
        slots = pages[first_page[sequence] + positions // page_size] * page_size + positions % page_size
        return positions, slots, pages

    @torch.inference_mode()
    def execute(self, batch: Batch, carried: CarriedTokens | None = None) -> torch.Tensor:
        """Logits [sequences completing their known tokens, vocab] in batch order (a
        sequence with drafts: 1 + num_draft_tokens rows, its last known token's first)."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch, carried)
        if self.verify_graphs is not None and self.verify_graphs.can_run(batch, carried):
            return self.verify_graphs.run(batch, carried)
        self.prepare(batch, carried)
        self.attention.prepare(batch)
        return self.model.compute_logits(self.model(batch, self.attention, batch.logits_indices))
