"""Sending a workload: open loop (Poisson arrivals at a request rate, or all at once)
or closed loop (a fixed number of conversations in flight), with a progress bar.

The arrival process schedules conversations; a conversation's later turns follow its
previous reply (a user answers after reading). A turn that fails ends its conversation:
the next turn would need the reply as history.
"""
from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass
from typing import IO

from bench.client.transport import ChatMessage, Outgoing, RequestTiming, Transport
from bench.client.workloads import Conversation


@dataclass(frozen=True)
class LoadShape:
    """Exactly one of the two is set."""

    request_rate: float | None = None  # open loop: conversations per second; inf: all at once
    concurrency: int | None = None  # closed loop

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        return "rate inf" if self.request_rate == math.inf else f"rate {self.request_rate:g}/s"


@dataclass
class RunResult:
    shape: LoadShape
    timings: list[RequestTiming]
    duration_s: float  # first send to last reply
    planned: int  # requests (turns) the workload holds


class Progress:
    """tqdm when it is installed, else a plain bar on stderr (a line per 10% when
    stderr is not a terminal, so logs stay readable)."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream: IO[str] | None = None,
                 use_tqdm: bool = True) -> None:
        self.total, self.label, self.done = total, label, 0
        self.enabled = enabled
        self._stream = stream or sys.stderr
        self._bar = None
        self._last = 0.0
        if enabled and use_tqdm:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=label, unit="req", file=self._stream, leave=True)
            except ImportError:
                pass

    def update(self, failed: bool = False) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
        else:
            self._plain()

    def _plain(self) -> None:
        tty = self._stream.isatty()
        step = max(1, self.total // 10)
        if not tty and self.done % step and self.done != self.total:
            return
        now = time.monotonic()
        if tty and now - self._last < 0.2 and self.done != self.total:
            return
        self._last = now
        filled = int(30 * self.done / max(1, self.total))
        line = f"{self.label}: [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}"
        self._stream.write(("\r" + line) if tty else line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._stream.isatty():
            self._stream.write("\n")


def arrival_offsets(count: int, rate: float, rng: random.Random) -> list[float]:
    """Seconds after the start at which each conversation begins: a Poisson process
    (exponential gaps of mean 1/rate); all zero for an infinite rate."""
    if rate == math.inf:
        return [0.0] * count
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


async def run(conversations: list[Conversation], transport: Transport, shape: LoadShape,
              progress: Progress, seed: int = 0) -> RunResult:
    timings: list[RequestTiming] = []
    start = time.perf_counter()
    if shape.concurrency is not None:
        await _closed_loop(conversations, transport, shape.concurrency, timings, progress)
    else:
        assert shape.request_rate is not None
        offsets = arrival_offsets(len(conversations), shape.request_rate, random.Random(seed + 1))
        await asyncio.gather(*(_at(start + offset, index, conversation, transport, timings, progress)
                               for index, (conversation, offset) in enumerate(zip(conversations, offsets))))
    progress.close()
    sent = [t.start for t in timings]
    ends = [t.token_times[-1] if t.token_times else t.start for t in timings]
    duration = (max(ends) - min(sent)) if timings else 0.0
    return RunResult(shape, sorted(timings, key=lambda t: t.start), duration,
                     sum(len(c.turns) for c in conversations))


async def _at(when: float, index: int, conversation: Conversation, transport: Transport,
              timings: list[RequestTiming], progress: Progress) -> None:
    delay = when - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    await converse(index, conversation, transport, timings, progress, scheduled=when)


async def _closed_loop(conversations: list[Conversation], transport: Transport, concurrency: int,
                       timings: list[RequestTiming], progress: Progress) -> None:
    queue = iter(enumerate(conversations))

    async def client() -> None:
        for index, conversation in queue:  # one shared iterator: each conversation is taken once
            await converse(index, conversation, transport, timings, progress)

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def converse(index: int, conversation: Conversation, transport: Transport, timings: list[RequestTiming],
                   progress: Progress, scheduled: float | None = None) -> None:
    """Send a conversation's turns in order, each with the history so far."""
    history: list[ChatMessage] = [("system", conversation.system, ())] if conversation.system else []
    for number, turn in enumerate(conversation.turns):
        if conversation.chat:
            history.append(("user", turn.text, turn.images))
        timing = RequestTiming(time.perf_counter(), scheduled if number == 0 else None,
                               conversation=index, turn=number)
        await transport.send(Outgoing(turn, tuple(history)), timing)
        if timing.output_tokens == 0:
            timing.output_tokens = len(timing.token_times)
        if timing.error is None and not timing.token_times:
            timing.error = "the stream ended without a token"
        timings.append(timing)
        progress.update(timing.error is not None)
        if timing.error is not None:
            return
        history.append(("assistant", timing.text, ()))
