"""Acceptance rules for drafted tokens, one position at a time.

Greedy: a draft is accepted while it equals the target's argmax; the first mismatch is
replaced by the argmax (so the output is the non-speculative greedy output exactly).

Sampled (rejection sampling): draft d drawn from q is accepted with probability
min(1, p(d) / q(d)); on rejection the token is drawn from the residual
max(p - q, 0) / sum(max(p - q, 0)). Whatever q is, the emitted token is distributed as p
exactly: P(emit x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) r(x) = p(x).
A deterministic proposal (n-gram) is q = a point mass at d: accept with probability
p(d), else draw from p with d removed. After K accepted drafts the bonus token is drawn
from the last position's p as an ordinary sample.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Verdict(NamedTuple):
    token: int  # the draft itself when accepted, else the replacement drawn
    accepted: bool


def verify_greedy(target_token: int, draft: int) -> Verdict:
    return Verdict(draft, True) if draft == target_token else Verdict(target_token, False)


def verify_sampled(p: torch.Tensor, draft: int, q: torch.Tensor | None, generator: torch.Generator) -> Verdict:
    """p [V] the target's distribution at this position, q [V] the draft's (None: a point
    mass at `draft`); both on the CPU, float."""
    q_draft = 1.0 if q is None else float(q[draft])
    u = float(torch.rand((), generator=generator))
    # Accept with probability min(1, p/q): u < p/q, written without dividing by q.
    if u * q_draft < float(p[draft]):
        return Verdict(draft, True)
    if q is None:
        residual = p.clone()
        residual[draft] = 0.0
    else:
        residual = torch.clamp(p - q, min=0.0)
    total = float(residual.sum())
    if not total > 0.0:  # only where p == q up to rounding (then u < 1 accepts): draw from p
        residual, total = p, float(p.sum())
    return Verdict(int(torch.multinomial(residual / total, 1, generator=generator)), False)


def rejection_sample(target: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
                     generator: torch.Generator) -> list[int]:
    """The tokens one verify step emits for fixed target rows: target [K+1, V] (row i is
    the distribution after drafts[:i]), draft_probs [K, V] or None. Accepted drafts,
    then the replacement of the first rejected one or the bonus token. (The engine
    verifies row by row instead, as penalties make row i depend on the tokens before
    it; this is the same rule for rows known up front, and what the tests check.)"""
    out = []
    for i, draft in enumerate(drafts):
        verdict = verify_sampled(target[i], draft, None if draft_probs is None else draft_probs[i], generator)
        out.append(verdict.token)
        if not verdict.accepted:
            return out
    out.append(int(torch.multinomial(target[len(drafts)], 1, generator=generator)))
    return out
