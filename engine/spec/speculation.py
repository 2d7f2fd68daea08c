"""What the engine holds when speculation is on: proposes drafts before a step is
scheduled and turns a verify step's logits into each request's accepted tokens.

A step's flow: `propose` sets `draft_token_ids` of the decoding requests; the scheduler
gives each 1 + len(drafts) tokens (its last known token, then the drafts) and pages for
them; the runner returns a logits row per position; `verify` accepts a prefix of the
drafts and adds one token (the replacement of the first rejected draft, or the bonus
after the last). The engine then appends the tokens and rolls the computed count back to
num_tokens - 1: the KV of rejected drafts stays in the request's pages as garbage past
its computed tokens, which the next step overwrites and nothing reads (attention reads
a sequence's first seq_len slots only; a cache insert covers computed tokens only).
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch

from engine.batch import Batch
from engine.request import Request, TokenLogprob
from engine.sampler import Sampler, logprob_entry, sampling_choice
from engine.spec.drafter import Drafter, DrafterSetup, create_drafter
from engine.spec.stats import SpecStats
from engine.spec.verify import verify_greedy, verify_sampled


class Verified(NamedTuple):
    """A request's tokens from one step (speculative or not), in order."""

    request: Request
    token_ids: list[int]
    logprobs: list[TokenLogprob]


class Speculation:
    def __init__(self, setup: DrafterSetup, sampler: Sampler, context_limit: int) -> None:
        self.drafter: Drafter = create_drafter(setup)
        self.num_speculative_tokens = setup.config.num_speculative_tokens
        self.stats = SpecStats(self.num_speculative_tokens)
        self.sampler = sampler
        self.context_limit = context_limit
        self._draft_probs: dict[Request, torch.Tensor] = {}  # of this step's sampled drafts

    def draft_limit(self, request: Request) -> int:
        """Drafts this step may verify for `request`: the step emits up to limit + 1
        tokens, which must fit max_tokens and the context; <= 0 means none."""
        if request.num_tokens - request.num_computed_tokens != 1 or not request.output_token_ids:
            return 0  # not decoding (a prompt, or a recompute after preemption)
        return min(self.num_speculative_tokens,
                   request.params.max_tokens - len(request.output_token_ids) - 1,
                   self.context_limit - request.num_tokens - 1)

    def propose(self, running: list[Request]) -> None:
        """Set draft_token_ids of every running request (empty where it drafts nothing)."""
        self._draft_probs.clear()
        decoding, limits = [], []
        for request in running:
            if request.draft_token_ids:
                request.draft_token_ids = []
            limit = self.draft_limit(request)
            if limit > 0:
                decoding.append(request)
                limits.append(limit)
        if not decoding:
            return
        start = time.perf_counter()
        proposals = self.drafter.propose(decoding, limits)
        self.stats.record_drafter(time.perf_counter() - start)
        for request, drafts, limit in zip(decoding, proposals, limits):
            request.draft_token_ids = drafts.token_ids[:limit]
            if drafts.probs is not None and request.draft_token_ids:
                self._draft_probs[request] = drafts.probs

    def release(self, request: Request) -> None:
        request.draft_token_ids = []
        self.drafter.release(request)

    def verify(self, batch: Batch, logits: torch.Tensor) -> list[Verified]:
        """Every sampling request's tokens, in batch order. Requests without drafts
        sample exactly as Sampler.sample would."""
        sampling = [item for item in batch.scheduled if item.completes_prompt]
        plain = all(item.request.plain_greedy for item in sampling)
        argmax = logits.argmax(dim=-1).tolist() if plain else None
        results: list[Verified | None] = []
        plain_rows: list[int] = []  # rows of requests without drafts (non-greedy batch)
        row, accepted_total = 0, 0
        for item in sampling:
            request, drafts = item.request, item.num_draft_tokens
            if drafts == 0 and argmax is not None:
                results.append(Verified(request, [argmax[row]], []))
            elif drafts == 0:
                plain_rows.append(row)
                results.append(None)
            else:
                verified = self._verify_request(request, logits[row:row + drafts + 1],
                                                argmax[row:row + drafts + 1] if argmax is not None else None)
                accepted = len(verified.token_ids) - 1
                accepted_total += accepted
                self.stats.record_request(drafts, accepted, accepted + 1)
                results.append(verified)
            row += drafts + 1
        if any(item.num_draft_tokens for item in sampling):
            self.stats.record_step(accepted_total)
        return self._fill_plain(results, sampling, plain_rows, logits)

    def _fill_plain(self, results: list[Verified | None], sampling: list, plain_rows: list[int],
                    logits: torch.Tensor) -> list[Verified]:
        """Sample the rows of requests that had no drafts, in one Sampler call."""
        if plain_rows:
            pending = [i for i, r in enumerate(results) if r is None]
            requests = [sampling[i].request for i in pending]
            samples = self.sampler.sample(logits[plain_rows], requests)
            for i, request, (token, logprob) in zip(pending, requests, samples):
                results[i] = Verified(request, [token], [logprob] if logprob is not None else [])
        return [r for r in results if r is not None]

    def _verify_request(self, request: Request, rows: torch.Tensor, argmax: list[int] | None) -> Verified:
        drafts = request.draft_token_ids
        if argmax is None:
            return self._verify_rows(request, rows.float(), drafts)
        tokens = []
        for i, draft in enumerate(drafts):
            verdict = verify_greedy(argmax[i], draft)
            tokens.append(verdict.token)
            if not verdict.accepted:
                return Verified(request, tokens, [])
        tokens.append(argmax[len(drafts)])
        return Verified(request, tokens, [])

    def _verify_rows(self, request: Request, rows: torch.Tensor, drafts: list[int]) -> Verified:
        """Position by position: row i's penalties see the tokens accepted before it, so
        they are appended to the request's output while it is verified (and taken off
        again: the engine appends what it keeps, checking stops)."""
        params, outputs = request.params, request.output_token_ids
        base, probs = len(outputs), self._draft_probs.get(request)
        raw = torch.log_softmax(rows, dim=-1) if params.logprobs is not None else None
        tokens: list[int] = []
        logprobs: list[TokenLogprob] = []
        try:
            for i in range(len(drafts) + 1):
                token, accepted = self._verify_position(request, rows[i].clone(), drafts, i, probs, base + i)
                tokens.append(token)
                if raw is not None:
                    entry = logprob_entry(raw[i], token, params)
                    assert entry is not None
                    logprobs.append(entry)
                if not accepted:
                    break
                outputs.append(token)
        finally:
            del outputs[base:]
        return Verified(request, tokens, logprobs)

    def _verify_position(self, request: Request, row: torch.Tensor, drafts: list[int], i: int,
                         probs: torch.Tensor | None, output_index: int) -> tuple[int, bool]:
        """(token, accepted) at position i; the bonus position (i == len(drafts)) is an
        ordinary sample and counts as not accepted (the step ends there)."""
        choice = sampling_choice(row, request)
        generator = self.sampler.generator_for(request, output_index)
        if i == len(drafts):
            if choice.token is not None:
                return choice.token, False
            assert choice.probs is not None
            return int(torch.multinomial(choice.probs, 1, generator=generator)), False
        if choice.token is not None:  # the target is a point mass: greedy acceptance is exact
            return tuple(verify_greedy(choice.token, drafts[i]))  # type: ignore[return-value]
        assert choice.probs is not None
        q = None if probs is None else probs[i].float().cpu()
        return tuple(verify_sampled(choice.probs.float(), drafts[i], q, generator))  # type: ignore[return-value]
