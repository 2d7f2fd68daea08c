"""Drive an autoscaled cluster through three phases and print every scaling decision:
a burst of long prompts (the prefill pool should grow), a burst of long generations (the
decode pool should grow), then silence (both shrink back to their minimum).

    epd up --prefill 1 --decode 1 --autoscale prefill=1:3 --autoscale decode=1:3 \\
        --router-arg=--autoscale-decode-running=6 &
    python -m bench.autoscale_demo --router http://127.0.0.1:8000 --grpc 127.0.0.1:50051
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from typing import Any

import grpc
import httpx

from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc


async def _one(stub: pb_grpc.RouterStub, prompt: list[int], max_tokens: int) -> str | None:
    request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    request.token_ids.ids.extend(prompt)
    try:
        async for response in stub.Generate(request, timeout=300):
            if response.HasField("finished"):
                return None if response.finished.reason == pb.FINISH_REASON_LENGTH else str(response.finished)
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "stream ended without a finish"


async def burst(address: str, count: int, concurrency: int, prompt_len: int, max_tokens: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 500) for _ in range(prompt_len)] for _ in range(count)]
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RouterStub(channel)

        async def limited(prompt: list[int]) -> str | None:
            async with gate:
                return await _one(stub, prompt, max_tokens)
        results = await asyncio.gather(*(limited(p) for p in prompts))
    return [r for r in results if r is not None]


def pools(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/pools", timeout=10).json()


def settle(url: str, sizes: dict[str, int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = pools(url)["pools"]
        if all(state[p]["replicas"] == n and state[p]["ready"] == n and not state[p]["draining"]
               for p, n in sizes.items()):
            return True
        time.sleep(0.5)
    return False


def run(url: str, address: str, scale: float = 1.0, silence_timeout_s: float = 120.0) -> dict[str, Any]:
    """The three phases; returns the decisions, the failures and the phase start times."""
    marks, failures = {"start": time.time()}, []
    failures += asyncio.run(burst(address, int(64 * scale), 16, 700, 2, seed=1))  # long prompts
    marks["generations"] = time.time()
    failures += asyncio.run(burst(address, int(48 * scale), 24, 12, 300, seed=2))  # long generations
    marks["silence"] = time.time()
    settled = settle(url, {"prefill": 1, "decode": 1}, silence_timeout_s)
    marks["end"] = time.time()
    return {"decisions": pools(url)["decisions"], "failures": failures, "marks": marks, "settled": settled}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default="http://127.0.0.1:8000")
    parser.add_argument("--grpc", default="127.0.0.1:50051")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of requests")
    args = parser.parse_args()
    print("command:", " ".join(["python -m bench.autoscale_demo", *sys.argv[1:]]))
    result = run(args.router, args.grpc, args.scale)
    start = result["marks"]["start"]
    for name, at in result["marks"].items():
        print(f"phase {name:<12} at +{at - start:6.1f} s")
    for d in result["decisions"]:
        print(f"+{d['time'] - start:6.1f} s  {d['pool']:<8} {d['from']} -> {d['to']}  ({d['source']})  {d['inputs']}")
    print(f"failed requests: {len(result['failures'])}; back to the minimum: {result['settled']}")
    return 0 if not result["failures"] and result["settled"] else 1


if __name__ == "__main__":
    sys.exit(main())
