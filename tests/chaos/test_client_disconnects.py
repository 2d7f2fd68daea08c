"""Clients that go away (gRPC cancel, HTTP connection closed) at seeded moments, before
their first token or mid-stream, alongside clients that stay: the workers abort the
abandoned requests and, once idle, hold no page outside their prefix caches; the
clients that stayed get the offline engine's output, and each abandoned stream got a
prefix of it."""
from __future__ import annotations

import asyncio
import json
import random

import grpc
import httpx
import pytest

from tests.chaos.conftest import MAX_TOKENS, POOL
from tests.chaos.harness import ChaosCluster, Reference, assert_pages_clean, flush_caches, rng_for
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(300)
CLIENTS = 64
LONG = 200  # tokens asked of an abandoned stream: it would run long, were it not aborted


async def _grpc(stub: pb_grpc.RouterStub, prompt: list[int], leave_after: int | None) -> list[int]:
    """Tokens received; `leave_after`: cancel once this many arrived (0: right away)."""
    request = pb.GenerateRequest(sampling=pb.SamplingParams(
        max_tokens=MAX_TOKENS if leave_after is None else LONG, temperature=0.0, ignore_eos=True))
    request.token_ids.ids.extend(prompt)
    call = stub.Generate(request, timeout=60)
    tokens: list[int] = []
    if leave_after == 0:
        await asyncio.sleep(0.05)
        call.cancel()
        return tokens
    async for response in call:
        tokens.extend(response.chunk.token_ids)
        if leave_after is not None and len(tokens) >= leave_after:
            call.cancel()
            break
    return tokens


async def _http(http: httpx.AsyncClient, prompt: list[int], leave_after: int) -> str:
    """Text received before closing the connection after `leave_after` SSE events."""
    body = {"prompt": prompt, "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}
    text, events = "", 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[len("data: "):])["choices"][0]["text"]
                events += 1
                if events >= leave_after:
                    break  # leaving the block closes the connection
    return text


async def _clients(cluster: ChaosCluster, reference: Reference, rng: random.Random) -> tuple[int, int]:
    plans = [(rng.randrange(len(POOL)), rng.choice([None, 0, 1, 3, 8]), rng.random() < 0.3) for _ in range(CLIENTS)]
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel, \
            httpx.AsyncClient(base_url=cluster.http_url, timeout=60) as http:
        stub = pb_grpc.RouterStub(channel)

        async def one(index: int, leave_after: int | None, over_http: bool) -> bool:
            await asyncio.sleep(rng.uniform(0, 1.0))
            if over_http and leave_after:
                got = await _http(http, POOL[index], leave_after)
                assert reference.texts[index].startswith(got) or got.startswith(reference.texts[index]), index
                return False
            tokens = await _grpc(stub, POOL[index], leave_after)
            expected = reference.tokens[index]
            if leave_after is None:
                assert tokens == expected, index
            else:  # a prefix of the offline output (the reference has MAX_TOKENS of it)
                assert tokens[:MAX_TOKENS] == expected[:len(tokens)], index
            return leave_after is None

        stayed = await asyncio.gather(*(one(*plan) for plan in plans))
    return sum(stayed), CLIENTS - sum(stayed)


def test_clients_that_leave_free_every_page(cluster: ChaosCluster, reference: Reference) -> None:
    asyncio.run(flush_caches(cluster))
    stayed, left = asyncio.run(_clients(cluster, reference, rng_for("disconnects")))
    print(f"{stayed} clients stayed, {left} left early")
    assert stayed > 0 and left > 0
    assert_pages_clean(cluster, timeout_s=10.0)
