"""Turns the last-position logits of a step into tokens (and logprobs when asked).

Seeded requests draw from a generator seeded by (seed, output index), so a request's
samples do not depend on what else is in the batch, nor on preemption and recompute.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from engine.request import Request, TokenLogprob
from engine.sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """Repetition (over prompt and output, as transformers does) then OpenAI-style
    frequency/presence penalties (over the output). A repetition penalty near 0 may
    overflow seen tokens to +inf; `finite_logits` bounds that."""
    p = request.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long, device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and request.output_token_ids:
        out = torch.tensor(request.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """+inf (a penalty that overflowed) becomes the dtype's largest value, NaN -inf:
    softmax over the row stays a distribution."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masking on a 1-D logits row; masked
    entries become -inf. Returns the filtered, temperature-scaled logits."""
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # before it already does.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def is_plain_greedy(params: SamplingParams) -> bool:
    """Greedy with nothing that needs the host per row: argmax of the raw logits."""
    return params.plain_greedy


class Sampler:
    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[tuple[int, TokenLogprob | None]]:
        """logits [N, vocab] (one row per request) -> a token per request."""
        if all(is_plain_greedy(r.params) for r in requests):
            # One argmax and one device-to-host read for the whole batch.
            return [(int(t), None) for t in logits.argmax(dim=-1).tolist()]
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        results = []
        for row, request in zip(logits, requests):
            token = self._sample_row(row.clone(), request)
            results.append((token, logprob_entry(raw_logprobs[len(results)], token, request.params)))
        return results

    def _sample_row(self, row: torch.Tensor, request: Request) -> int:
        choice = sampling_choice(row, request)
        if choice.token is not None:
            return choice.token
        assert choice.probs is not None
        generator = self.generator_for(request, len(request.output_token_ids))
        return int(torch.multinomial(choice.probs, 1, generator=generator))

    def generator_for(self, request: Request, output_index: int, stream: int = 0) -> torch.Generator:
        """The generator that draws output token number `output_index`: seeded by
        (seed, index, stream) for a seeded request, else the sampler's own. `stream`
        separates independent draws of one position (speculation: the drafter's sample
        must not be correlated with the verifier's)."""
        seed = request.params.seed
        if seed is None:
            return self._generator
        return seeded_generator(seed, output_index, stream)


def seeded_generator(seed: int, output_index: int, stream: int = 0) -> torch.Generator:
    """The generator of a seeded request's output token number `output_index`; stream 0
    is what plain sampling uses (its samples depend on nothing else)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + output_index + stream * 7_919_000_011) % (2**63))


class SamplingChoice(NamedTuple):
    """What one row's sampling reduces to: the distribution to draw from (CPU, float),
    or, when that is None, the one token it must be (greedy, or nothing left to draw)."""

    probs: torch.Tensor | None
    token: int | None  # set exactly when probs is None


def sampling_choice(row: torch.Tensor, request: Request) -> SamplingChoice:
    """Penalties, temperature and filters on one logits row (modified in place), as
    sampling applies them; speculation's verifier reads the same distribution."""
    row = finite_logits(apply_penalties(row, request))
    if request.params.greedy:
        return SamplingChoice(None, int(torch.argmax(row)))
    probs = torch.softmax(filter_logits(row, request.params), dim=-1).cpu()
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        return SamplingChoice(None, int(torch.argmax(row)))  # nothing left to draw from: the best remaining token
    return SamplingChoice(probs, None)


def logprob_entry(logprobs: torch.Tensor, token: int, params: SamplingParams) -> TokenLogprob | None:
    if params.logprobs is None:
        return None
    top: list[tuple[int, float]] = []
    if params.logprobs > 0:
        values, ids = torch.topk(logprobs, params.logprobs)
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenLogprob(token, float(logprobs[token]), top)
