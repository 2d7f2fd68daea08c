"""Speculation's counts, kept by the engine thread and read (copied) by the worker's
metrics thread: plain ints, floats and lists, no locks needed under the GIL."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds (the last bucket is +Inf) of the per-engine-step histograms.
DRAFTER_SECONDS_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
ACCEPTED_PER_STEP_BOUNDS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class SpecStats:
    num_speculative_tokens: int
    verify_steps_total: int = 0  # request-steps that verified at least one draft
    draft_tokens_total: int = 0  # drafts proposed and verified
    accepted_tokens_total: int = 0  # drafts accepted
    emitted_tokens_total: int = 0  # tokens verify steps produced (accepted + one each)
    drafter_seconds_total: float = 0.0
    drafter_calls_total: int = 0
    # acceptance_length_counts[n]: request-steps that emitted n tokens (1 .. K + 1).
    acceptance_length_counts: list[int] = field(default_factory=list)
    # Per engine step that drafted: the drafter's seconds and the drafts accepted over
    # the whole batch, one count per bound of the *_BOUNDS above, then +Inf.
    drafter_seconds_counts: list[int] = field(default_factory=lambda: [0] * (len(DRAFTER_SECONDS_BOUNDS) + 1))
    accepted_per_step_counts: list[int] = field(default_factory=lambda: [0] * (len(ACCEPTED_PER_STEP_BOUNDS) + 1))

    def __post_init__(self) -> None:
        if not self.acceptance_length_counts:
            self.acceptance_length_counts = [0] * (self.num_speculative_tokens + 2)

    def record_request(self, drafted: int, accepted: int, emitted: int) -> None:
        self.verify_steps_total += 1
        self.draft_tokens_total += drafted
        self.accepted_tokens_total += accepted
        self.emitted_tokens_total += emitted
        self.acceptance_length_counts[min(accepted + 1, len(self.acceptance_length_counts) - 1)] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verify step and request (1 = every draft rejected; K + 1 = all accepted)."""
        steps = self.verify_steps_total
        return (self.accepted_tokens_total + steps) / steps if steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens_total / self.draft_tokens_total if self.draft_tokens_total else 0.0

    def record_drafter(self, seconds: float) -> None:
        self.drafter_calls_total += 1
        self.drafter_seconds_total += seconds
        self.drafter_seconds_counts[bisect.bisect_left(DRAFTER_SECONDS_BOUNDS, seconds)] += 1

    def record_step(self, accepted: int) -> None:
        self.accepted_per_step_counts[bisect.bisect_left(ACCEPTED_PER_STEP_BOUNDS, accepted)] += 1

    def as_dict(self) -> dict[str, float]:
        return dict(spec_verify_steps_total=self.verify_steps_total, spec_draft_tokens_total=self.draft_tokens_total,
                    spec_accepted_tokens_total=self.accepted_tokens_total,
                    spec_emitted_tokens_total=self.emitted_tokens_total,
                    spec_drafter_seconds_total=self.drafter_seconds_total,
                    spec_mean_acceptance_length=self.mean_acceptance_length)
