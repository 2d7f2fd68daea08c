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


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens
    # After this step every known token is computed: the step samples a new token. Fixed
    # when the item is made, before the step moves the request's counts (`of` computes it).
    completes_prompt: bool
    # Speculation: the last num_draft_tokens of num_new_tokens are the request's
    # draft_token_ids (positions past its known tokens); every one of the
    # 1 + num_draft_tokens last positions gets a logits row, in order.
    num_draft_tokens: int = 0

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> ScheduledRequest:
        return cls(request, num_new_tokens, request.num_computed_tokens + num_new_tokens == request.num_tokens)


# One shared empty placeholder for the tensor fields until the runner replaces them
# (nothing writes into a zero-size tensor); a fresh torch.empty each costs ~1.4 us.
_EMPTY = torch.empty(0, dtype=torch.long)


def _no_tensor() -> torch.Tensor:
    return _EMPTY


@dataclass
class Batch:
    scheduled: list[ScheduledRequest]
    # Filled by the model runner:
    input_ids: torch.Tensor = field(default_factory=_no_tensor)  # [T]
    positions: torch.Tensor = field(default_factory=_no_tensor)  # [T]
    slot_mapping: torch.Tensor = field(default_factory=_no_tensor)  # [T]
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    page_tables: list[torch.Tensor] = field(default_factory=list)  # per sequence, [pages]
    logits_indices: torch.Tensor = field(default_factory=_no_tensor)
    # Rows of the batch's tokens that are image positions, and their embeddings
    # [len(image_rows), hidden] (None when no image token is computed this step).
    image_rows: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    # Filled by the attention backend's prepare(), once per step; only it reads this.
    attention_metadata: Any = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __len__(self) -> int:
        return len(self.scheduled)
