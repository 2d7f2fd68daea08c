"""Overlap scheduling: the CPU schedules and launches step N+1 while the GPU runs step N.

A step's sampled tokens stay on the device; the next step takes its inputs from there
(`CarriedTokens`), and the host reads them one step late, through a pinned buffer and an
event, after it has launched the next step: nothing on this path waits for the GPU
except for a step that is already done or is the one before the step now running.

Until a token is read, its request holds a placeholder as the last output token, so
that the scheduler counts it. Invariant: only the last output token can be a placeholder,
its KV is not computed yet (so no cache insert covers it), and the runner overwrites it
on the device before any kernel reads it. A request that finishes on a token read late
was already scheduled once more: that step's work is discarded (its KV writes land in
pages that later steps may reuse only after it, in stream order).

Only batches whose sampling is plain greedy take this path; any other batch first
resolves the step in flight and then runs as `Engine.step` does. With speculation on,
every step resolves the one in flight before drafting, and verify steps run
synchronously (`_step_speculative` says why); they still replay CUDA graphs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.batch import Batch
from engine.model_runner import CarriedTokens
from engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from engine.engine import Engine, StepOutput

_PLACEHOLDER = 0  # value of a not-yet-read token; never read (see the invariant above)


@dataclass
class InFlightStep:
    requests: list[Request]  # requests that sample, in logits-row order
    output_indices: list[int]  # where each one's placeholder sits in output_token_ids
    tokens: torch.Tensor  # [N] sampled ids, on the device
    host_tokens: torch.Tensor  # [N] pinned copy, valid once `ready` has passed
    ready: torch.cuda.Event | None  # None on CPU, where the copy is already done


@dataclass
class OverlapTimings:
    """Host time per step, for benchmarks: `cpu` excludes `wait` (blocked on the GPU)."""

    steps: int = 0
    schedule: float = 0.0  # Scheduler.schedule
    launch: float = 0.0  # input preparation and kernel/graph launch of the next step
    cpu: float = 0.0  # all host time of step(), waits excluded
    wait: float = 0.0


class OverlapScheduler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.in_flight: InFlightStep | None = None
        self.timings = OverlapTimings()
        # Two pinned buffers alternate: step N's is read while step N+1's is written.
        self._host_buffers: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event] = []
        self._turn = 0

    @property
    def busy(self) -> bool:
        """A step is in flight whose tokens someone still waits for (a step holding only
        requests that finished meanwhile is waste, dropped at the next resolve)."""
        return self.in_flight is not None and not all(r.finished for r in self.in_flight.requests)

    def step(self) -> list[StepOutput]:
        if self.engine.speculation is not None:
            return self._step_speculative()
        start = time.perf_counter()
        wait_before = self.timings.wait
        batch = self.engine.scheduler.schedule()
        self.timings.schedule += time.perf_counter() - start
        if batch.scheduled and not self._can_overlap(batch):
            outputs = self._resolve()
            outputs += self._run_synchronously(batch)
        else:
            launch_start = time.perf_counter()
            launched = self._launch(batch) if batch.scheduled else None
            self.timings.launch += time.perf_counter() - launch_start
            outputs = self._resolve()
            self.in_flight = launched
        self.timings.steps += 1
        self.timings.cpu += time.perf_counter() - start - (self.timings.wait - wait_before)
        return outputs

    def _step_speculative(self) -> list[StepOutput]:
        """With speculation the host drafts from tokens it has read: the step in flight is
        resolved before drafting, and a batch that verifies drafts runs synchronously. A
        batch without drafts still launches asynchronously and is read at the next step.

        Why a verify step cannot overlap the next one: what step N+1 launches depends on
        how many of step N's drafts were accepted, which only the host knows once it has
        read step N. Per request it decides (a) the input tokens (the emitted tokens
        themselves, not a placeholder the device could fill: the n-gram lookup and the
        draft model's catch-up both read them), (b) the positions and KV slots (the
        computed count moves by 1 + accepted, 1..K+1), (c) the pages to reserve and the
        draft limits (max_tokens and the context), and (d) whether it stopped. A decode
        step can carry its one sampled token into the next step on the device because
        all of that is known in advance; with drafts none of it is. Launching step N+1
        under an assumption (all accepted, or none) would need a device-side acceptance,
        device-side n-gram drafting and KV rollback of a mis-guessed launch: not done.
        What the host does between the read and the next launch (verify, append, draft,
        schedule, stage the graph inputs) is the GPU's idle time per verify step."""
        engine, start = self.engine, time.perf_counter()
        wait_before = self.timings.wait
        outputs = self._resolve()
        assert engine.speculation is not None
        engine.speculation.propose(engine.scheduler.running)
        batch = engine.scheduler.schedule()
        if any(item.num_draft_tokens for item in batch.scheduled) or not self._can_overlap(batch):
            outputs += self._run_synchronously(batch)
        elif batch.scheduled:
            self.in_flight = self._launch(batch)
        self.timings.steps += 1
        self.timings.cpu += time.perf_counter() - start - (self.timings.wait - wait_before)
        return outputs

    @staticmethod
    def _can_overlap(batch: Batch) -> bool:
        for item in batch.scheduled:
            if item.completes_prompt and not item.request.plain_greedy:
                return False
        return True

    def _launch(self, batch: Batch) -> InFlightStep:
        previous = self.in_flight
        carried = None
        if previous is not None:
            carried = CarriedTokens({r: i for i, r in enumerate(previous.requests)}, previous.tokens)
        self.engine.ensure_embeddings(batch)
        logits = self.engine.runner.execute(batch, carried)
        tokens = logits.argmax(dim=-1)
        # One pass: count prompt tokens, move the computed counts, and give each request
        # that samples its placeholder (in logits-row order, as `sampling` lists them).
        sampling: list[Request] = []
        indices: list[int] = []
        prefill_tokens = 0
        for item in batch.scheduled:
            request = item.request
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            prompt_len = len(request.prompt_token_ids)
            if start < prompt_len:
                prefill_tokens += min(end, prompt_len) - start
            request.num_computed_tokens = end
            if item.completes_prompt:
                outputs = request.output_token_ids
                outputs.append(_PLACEHOLDER)
                sampling.append(request)
                indices.append(len(outputs) - 1)
        self.engine.counters.prefill_tokens_total += prefill_tokens
        host, ready = self._copy_to_host(tokens)
        return InFlightStep(sampling, indices, tokens, host, ready)

    def _copy_to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if not tokens.is_cuda:
            return tokens, None
        count = tokens.shape[0]
        if not self._host_buffers or self._host_buffers[0].shape[0] < count:
            size = max(count, self.engine.config.max_num_seqs)
            self._host_buffers = [torch.empty(size, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        self._turn ^= 1
        host = self._host_buffers[self._turn][:count]
        host.copy_(tokens, non_blocking=True)
        self._events[self._turn].record()
        return host, self._events[self._turn]

    def _resolve(self) -> list[StepOutput]:
        """Read the in-flight step's tokens, replace the placeholders, apply stops."""
        from engine.engine import StepOutput

        step, self.in_flight = self.in_flight, None
        if step is None:
            return []
        if step.ready is not None:
            start = time.perf_counter()
            step.ready.synchronize()
            self.timings.wait += time.perf_counter() - start
        engine, finished = self.engine, RequestStatus.FINISHED
        outputs = []
        read = 0
        for request, index, token in zip(step.requests, step.output_indices, step.host_tokens.tolist()):
            if request.status is finished:  # aborted, or finished on an earlier token
                continue
            read += 1
            tokens = request.output_token_ids
            tokens[index] = token
            # Stop checks see exactly the tokens read so far (index + 1 of them); a newer
            # placeholder may follow, which a finished request drops.
            if request.params.stop and len(tokens) > index + 1:
                reason = self._check_stop_strings(request, index, token)
            else:
                reason = engine._check_stop(request, token, index + 1)
            if reason is not None:
                del tokens[index + 1:]
                engine._finish(request, reason)
            outputs.append(StepOutput(request.request_id, [token], [], reason is not None, reason, request))
        engine.counters.generated_tokens_total += read
        return outputs

    def _check_stop_strings(self, request: Request, index: int, token: int) -> str | None:
        """Stop strings decode the output list itself: hold the newer placeholder back."""
        tokens = request.output_token_ids
        later = tokens[index + 1:]
        del tokens[index + 1:]
        reason = self.engine._check_stop(request, token)
        if reason is None:
            tokens.extend(later)
        return reason

    def _run_synchronously(self, batch: Batch) -> list[StepOutput]:
        # Requests that finished on the tokens just read were scheduled before we knew.
        batch.scheduled = [s for s in batch.scheduled if not s.request.finished]
        if not batch.scheduled:
            return []
        self.engine.ensure_embeddings(batch)
        logits = self.engine.runner.execute(batch)
        self.engine.last_logits = logits
        return self.engine._process(batch, logits)
