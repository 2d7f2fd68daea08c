"""The one batch object that travels from the scheduler to the model.

The scheduler decides which requests run and how many tokens each computes; the model
runner fills the tensors in place. Invariant: for sequence i, the new tokens occupy
positions [seq_lens[i] - query_lens[i], seq_lens[i]) and their K/V go to slot_mapping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens

    @property
    def completes_prompt(self) -> bool:
        """After this step every known token is computed: the step samples a new token."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class Batch:
    scheduled: list[ScheduledRequest]
    # Filled by the model runner:
    input_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # [T]
    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # [T]
    slot_mapping: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # [T]
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    page_tables: list[torch.Tensor] = field(default_factory=list)  # per sequence, [pages]
    logits_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    # Filled by the attention backend's prepare(), once per step; only it reads this.
    attention_metadata: Any = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __len__(self) -> int:
        return len(self.scheduled)
