"""Fills a Batch's tensors from the scheduled requests and runs the model on them."""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

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


def token_at(request: Request, index: int) -> int:
    """request.all_token_ids[index] without building the whole list."""
    prompt = request.prompt_token_ids
    return prompt[index] if index < len(prompt) else request.output_token_ids[index - len(prompt)]


class ModelRunner:
    def __init__(self, model: CausalLM, attention: AttentionBackend, device: torch.device,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.attention = attention
        self.device = device
        self.page_size = attention.kv_cache.page_size
        self.graphs = graphs  # CUDA graphs for decode batches, when enabled

    def prepare(self, batch: Batch, carried: CarriedTokens | None = None) -> None:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        pages: list[int] = []
        fill_rows: list[int] = []
        fill_sources: list[int] = []
        for item in batch.scheduled:
            request, start = item.request, item.request.num_computed_tokens
            end = start + item.num_new_tokens
            ids.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(request.pages[p // self.page_size] * self.page_size + p % self.page_size
                         for p in range(start, end))
            batch.query_lens.append(item.num_new_tokens)
            batch.seq_lens.append(end)
            pages.extend(request.pages[: -(-end // self.page_size)])
            if carried is not None and request in carried.source_rows:
                fill_rows.append(len(ids) - 1)
                fill_sources.append(carried.source_rows[request])
            if item.completes_prompt:
                logits_indices.append(len(ids) - 1)
        # One host-to-device copy for everything (pinned and non-blocking on CUDA).
        parts = [ids, positions, slots, logits_indices, pages, fill_rows, fill_sources]
        flat = torch.tensor([x for part in parts for x in part], dtype=torch.long)
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        views = flat.split([len(part) for part in parts])
        batch.input_ids, batch.positions, batch.slot_mapping, batch.logits_indices = views[:4]
        batch.page_tables = list(views[4].split([-(-n // self.page_size) for n in batch.seq_lens]))
        if fill_rows:
            assert carried is not None
            batch.input_ids[views[5]] = carried.tokens[views[6]]

    @torch.inference_mode()
    def execute(self, batch: Batch, carried: CarriedTokens | None = None) -> torch.Tensor:
        """Logits [sequences completing their known tokens, vocab] in batch order."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch, carried)
        self.prepare(batch, carried)
        self.attention.prepare(batch)
        hidden = self.model(batch, self.attention)
        return self.model.compute_logits(hidden[batch.logits_indices])
