"""Fills a Batch's tensors from the scheduled requests and runs the model on them."""
from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend
from engine.batch import Batch
from engine.models.llama import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, attention: AttentionBackend, device: torch.device) -> None:
        self.model = model
        self.attention = attention
        self.device = device
        self.page_size = attention.kv_cache.page_size

    def prepare(self, batch: Batch) -> None:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        for item in batch.scheduled:
            request, start = item.request, item.request.num_computed_tokens
            end = start + item.num_new_tokens
            ids.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(request.pages[p // self.page_size] * self.page_size + p % self.page_size
                         for p in range(start, end))
            batch.query_lens.append(item.num_new_tokens)
            batch.seq_lens.append(end)
            batch.page_tables.append(torch.tensor(request.pages[: -(-end // self.page_size)],
                                                  dtype=torch.long, device=self.device))
            if item.completes_prompt:
                logits_indices.append(len(ids) - 1)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        batch.input_ids, batch.positions = as_tensor(ids), as_tensor(positions)
        batch.slot_mapping, batch.logits_indices = as_tensor(slots), as_tensor(logits_indices)

    @torch.inference_mode()
    def execute(self, batch: Batch) -> torch.Tensor:
        """Logits [sequences completing their known tokens, vocab] in batch order."""
        self.prepare(batch)
        hidden = self.model(batch, self.attention)
        return self.model.compute_logits(hidden[batch.logits_indices])
