"""A steady stream of greedy gRPC requests against a router, in a background thread,
for tests that change the cluster under load (scaling, restarts). Prompts are token ids,
so outputs compare token for token with the offline engine."""
from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass

import grpc

from engine import LLM, SamplingParams
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc


def prompts(seed: int, count: int, low: int = 80, high: int = 240) -> list[list[int]]:
    """Prompts long enough for a remote prefill (above decode's local threshold of 64)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(low, high))] for _ in range(count)]


def offline(model: str | None, requests: list[list[int]], max_tokens: int) -> list[list[int]]:
    llm = LLM(model)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(requests, params)]


@dataclass
class Outcome:
    index: int  # which prompt
    tokens: list[int]
    error: str | None


class SteadyLoad:
    def __init__(self, address: str, requests: list[list[int]], max_tokens: int, concurrency: int = 6) -> None:
        self.address = address
        self.requests = requests
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._next = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        self._thread.join(timeout=180)
        assert not self._thread.is_alive(), "the load did not finish its requests within 180 s"
        return self.outcomes

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.RouterStub(channel)
            await asyncio.gather(*(self._client(stub) for _ in range(self.concurrency)))

    async def _client(self, stub: pb_grpc.RouterStub) -> None:
        while not self._stop.is_set():
            index = self._next % len(self.requests)
            self._next += 1
            self.outcomes.append(await self._one(stub, index))

    async def _one(self, stub: pb_grpc.RouterStub, index: int) -> Outcome:
        request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=self.max_tokens, temperature=0.0,
                                                                 ignore_eos=True))
        request.token_ids.ids.extend(self.requests[index])
        tokens: list[int] = []
        try:
            async for response in stub.Generate(request, timeout=120):
                if response.HasField("chunk"):
                    tokens.extend(response.chunk.token_ids)
                elif response.finished.reason != pb.FINISH_REASON_LENGTH:
                    return Outcome(index, tokens, f"finished with {response.finished}")
                else:
                    return Outcome(index, tokens, None)
        except grpc.aio.AioRpcError as exc:
            return Outcome(index, tokens, f"{exc.code().name}: {exc.details()}")
        return Outcome(index, tokens, "stream ended without a finish")

    def mismatches(self, expected: list[list[int]]) -> list[int]:
        return [o.index for o in self.outcomes if o.error is None and o.tokens != expected[o.index]]
