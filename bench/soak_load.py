"""The soak benchmark's load: a varied mix of streamed requests over HTTP and gRPC,
sent closed loop (to measure capacity) or open loop (Poisson arrivals at a rate).

Every fourth request is of each kind: HTTP `/v1/completions` with token ids, gRPC
`Generate` with token ids, HTTP `/v1/chat/completions` with a chat message, gRPC
`Generate` with text. Token-id prompts vary in length (16-256 tokens) and a third of
them start with one of a few shared prefixes, so prefix-cache hits, misses and eviction,
remote prefill (above decode's local threshold) and local prefill all occur. A request
counts as completed only when it streamed exactly `max_tokens` tokens (`ignore_eos`)
and finished without an error.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Callable

from bench.client.transport import (GrpcTransport, HttpTransport, Outgoing, RequestTiming, Sampling,
                                    Transport)
from bench.client.workloads import FIRST_TOKEN_ID, Turn

KINDS = ("http-ids", "grpc-ids", "http-chat", "grpc-text")
SHARED_PREFIXES = 8
SHARED_PREFIX_LEN = 96
VOCAB = 500  # the tiny model has 512 ids; random prompts stay below


@dataclass(frozen=True)
class Result:
    """One request as the client saw it. Times are `time.perf_counter()` seconds."""

    kind: str
    phase: str
    start: float
    end: float
    ttft_s: float | None  # None when it failed before its first token
    error: str | None

    @property
    def e2e_s(self) -> float:
        return self.end - self.start


class Mix:
    """The `index`-th request of a seeded sequence of varied requests."""

    def __init__(self, seed: int, max_tokens: int) -> None:
        self.rng = random.Random(seed)
        self.max_tokens = max_tokens
        self.prefixes = [self._ids(SHARED_PREFIX_LEN) for _ in range(SHARED_PREFIXES)]

    def _ids(self, length: int) -> tuple[int, ...]:
        return tuple(self.rng.randrange(FIRST_TOKEN_ID, VOCAB) for _ in range(length))

    def _words(self, count: int) -> str:
        letters = "abcdefghijklmnopqrstuvwxyz"
        return " ".join("".join(self.rng.choice(letters) for _ in range(self.rng.randint(2, 7)))
                        for _ in range(count))

    def request(self, index: int) -> tuple[str, Outgoing]:
        kind = KINDS[index % len(KINDS)]
        if kind.endswith("ids"):
            if self.rng.random() < 1 / 3:
                prompt = self.rng.choice(self.prefixes) + self._ids(self.rng.randint(8, 64))
            else:
                prompt = self._ids(self.rng.randint(16, 256))
            return kind, Outgoing(Turn(self.max_tokens, token_ids=prompt))
        text = self._words(self.rng.randint(4, 60))
        return kind, Outgoing(Turn(self.max_tokens, text=text), (("user", text, ()),))


class Client:
    """Both transports to one router, and the results of every request sent."""

    def __init__(self, http_url: str, grpc_address: str, mix: Mix, timeout_s: float) -> None:
        sampling = Sampling(temperature=0.0, ignore_eos=True)
        self.http = HttpTransport(http_url, None, None, timeout_s, sampling, max_connections=512)
        self.grpc = GrpcTransport(grpc_address, None, timeout_s, sampling)
        self.mix, self.timeout_s = mix, timeout_s
        self.results: list[Result] = []
        self.sent = 0

    async def __aenter__(self) -> Client:
        await asyncio.wait_for(self.http.resolve_model(), self.timeout_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()
        await self.grpc.close()

    async def one(self, phase: str) -> Result:
        """Send the next request of the mix and wait for its whole stream."""
        kind, outgoing = self.mix.request(self.sent)
        self.sent += 1
        transport: Transport = self.http if kind.startswith("http") else self.grpc
        timing = RequestTiming(time.perf_counter())
        try:  # the transports time out each read; this bounds the whole stream
            await asyncio.wait_for(transport.send(outgoing, timing), self.timeout_s)
        except asyncio.TimeoutError:
            timing.error = f"no complete reply within {self.timeout_s:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure is the request's, counted, not fatal
            timing.error = f"{type(exc).__name__}: {exc}"
        result = Result(kind, phase, timing.start, time.perf_counter(),
                        timing.ttft if timing.token_times else None, _error(timing, self.mix.max_tokens))
        self.results.append(result)
        return result


def _error(timing: RequestTiming, max_tokens: int) -> str | None:
    if timing.error is not None:
        return timing.error
    if timing.output_tokens != max_tokens:  # usage (HTTP) or Finished (gRPC) says how many
        return f"{timing.output_tokens} tokens streamed, expected {max_tokens}"
    return None


async def closed_loop(client: Client, concurrency: int, duration_s: float, stop: Callable[[], bool]) -> None:
    """`concurrency` callers, each sending its next request once the last one finished,
    until `duration_s` has passed (requests in flight then finish)."""
    deadline = time.perf_counter() + duration_s

    async def caller() -> None:
        while time.perf_counter() < deadline and not stop():
            await client.one("capacity")

    await asyncio.gather(*(caller() for _ in range(concurrency)))


@dataclass(frozen=True)
class OpenLoopPlan:
    rate: float  # requests per second
    duration_s: float
    seed: int
    on_tick: Callable[[float], str]  # seconds since the start -> the phase to label a request with
    stop: Callable[[], bool]  # True: send no more (a process died)


async def open_loop(client: Client, plan: OpenLoopPlan) -> tuple[set[asyncio.Task[Result]], int]:
    """Poisson arrivals at `plan.rate` for `plan.duration_s`: each request starts at its
    arrival time whatever the others are doing. Returns the requests still in flight at
    the end (the caller waits for them) and the most that were in flight at once."""
    rng, start = random.Random(plan.seed), time.perf_counter()
    in_flight: set[asyncio.Task[Result]] = set()
    most, arrival = 0, 0.0
    while not plan.stop():
        arrival += rng.expovariate(plan.rate)
        if arrival >= plan.duration_s:
            break
        delay = start + arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(client.one(plan.on_tick(arrival)))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        most = max(most, len(in_flight))
    remaining = start + plan.duration_s - time.perf_counter()
    if remaining > 0 and not plan.stop():
        await asyncio.sleep(remaining)  # the window ends at its end, not at the last arrival
    return in_flight, most


def capacity_rate(results: list[Result], start: float, end: float, ramp_s: float) -> float:
    """Completed requests per second among those that finished in [start + ramp_s, end]."""
    window = end - start - ramp_s
    done = [r for r in results if r.error is None and start + ramp_s <= r.end <= end]
    return len(done) / window if window > 0 else 0.0
