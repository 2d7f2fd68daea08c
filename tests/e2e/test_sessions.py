"""Sessions and pinned prefixes through a real cluster (router, 1 prefill and 2 decode
workers as processes, KV over tcp), issue 16's acceptance:

1. a 10-turn conversation with a session computes on each later turn only its new tokens
   (the prefill token counters in /cluster say so), its outputs equal the offline
   engine's (no sessions, no prefix cache), token for token;
2. a prefix pinned through /admin/pins stays resident under memory pressure (more
   distinct prompt tokens than any worker's page pool) and every session that starts
   with it hits it;
4. a decode worker killed with SIGKILL ends its sessions cleanly: the next turn is served
   by the other decode worker, with a full prefill there, and the session lives on.

One cluster for the module (starting one costs more than these tests); the kill test
must stay last: its victim is not restarted (a restart would only lengthen the teardown).
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from deploy.local import LocalCluster
from engine import LLM, SamplingParams
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from tests.e2e.cluster import cluster_status, make_cluster, run, wait_for

pytestmark = pytest.mark.timeout(300)
PAGE, PAGES = 16, 96  # 1,536 tokens of KV per worker
MAX_TOKENS = 8
WORKER_ARGS = ("--page-size", str(PAGE), "--num-pages", str(PAGES), "--max-pinned-fraction", "0.25")
ROUTER_ARGS = ("--health-interval", "0.1")  # /cluster catches up with the workers sooner


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with make_cluster(Path(tmp_path_factory.mktemp("sessions")), num_prefill=1, num_decode=2,
                      worker_args=WORKER_ARGS, router_args=ROUTER_ARGS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(page_size=PAGE, enable_prefix_cache=False)


def expected(llm: LLM, prompt: list[int]) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return llm.generate([prompt], params)[0].outputs[0].token_ids


async def _generate(cluster: LocalCluster, prompt: list[int], session: str = "") -> tuple[list[int], pb.Finished]:
    sampling = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling, session_id=session)
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        tokens, finished = [], None
        async for message in pb_grpc.RouterStub(channel).Generate(request, timeout=120):
            if message.HasField("chunk"):
                tokens += message.chunk.token_ids
            else:
                finished = message.finished
    assert finished is not None and finished.reason == pb.FINISH_REASON_LENGTH
    return tokens, finished


def generate(cluster: LocalCluster, prompt: list[int], session: str = "") -> list[int]:
    return run(_generate(cluster, prompt, session))[0]


def own_status(cluster: LocalCluster, name: str) -> pb.WorkerStatus:
    async def ask() -> pb.WorkerStatus:
        stub = pb_grpc.PrefillWorkerStub if name.startswith("prefill") else pb_grpc.DecodeWorkerStub
        async with grpc.aio.insecure_channel(cluster.worker_addresses[name]) as channel:
            return await stub(channel).Status(pb.StatusRequest(), timeout=5)
    return run(ask())


def settled(cluster: LocalCluster, names: tuple[str, ...] = ("prefill-0", "decode-0", "decode-1")) -> dict[str, Any]:
    """/cluster once it shows each (idle) worker's current counters: {worker id: entry}."""
    fields = ("prefill_tokens_total", "requests_total", "prefix_hit_tokens_total", "session_restores_total")
    snapshot: dict[str, Any] = {}

    def caught_up() -> bool:
        own = {name: own_status(cluster, name) for name in names}
        entries = {e["id"]: e for e in cluster_status(cluster)}
        snapshot.update(entries)
        return all(s.running == 0 and s.waiting == 0 and all(entries[n][f] == getattr(s, f) for f in fields)
                   for n, s in own.items())
    wait_for(caught_up, 20, 0.1)
    return snapshot


def total(snapshot: dict[str, Any], field: str) -> int:
    return sum(entry[field] for entry in snapshot.values() if entry["role"] in ("prefill", "decode"))


def test_ten_turns_compute_only_their_new_tokens(cluster: LocalCluster, offline: LLM) -> None:
    rng = random.Random(16)
    history = [rng.randrange(3, 500) for _ in range(80)]  # a system prompt
    held, restores = 0, None
    for turn in range(10):
        history += [rng.randrange(3, 500) for _ in range(rng.randrange(12, 30))]  # the user's message
        before = settled(cluster)
        out = generate(cluster, history, "conv-ten")
        after = settled(cluster)
        computed = total(after, "prefill_tokens_total") - total(before, "prefill_tokens_total")
        assert out == expected(offline, history), f"turn {turn}"
        # Turn 0 computes its whole prompt; each later one its new message and the last
        # reply token (the one token of the history whose KV no step had computed).
        assert computed == len(history) - held, f"turn {turn}: computed {computed} of {len(history)}"
        restores = total(after, "session_restores_total") - total(before, "session_restores_total")
        assert restores == (1 if turn else 0)
        held = len(history) + len(out) - 1
        history += out
    session = httpx.get(f"{cluster.http_url}/v1/sessions/conv-ten", timeout=5).json()
    assert (session["turns"], session["moves"]) == (10, 0)


def test_pinned_prefix_stays_resident_under_pressure_and_every_session_hits_it(cluster: LocalCluster) -> None:
    rng = random.Random(2)
    system = [rng.randrange(3, 500) for _ in range(4 * PAGE)]
    reply = httpx.post(f"{cluster.http_url}/admin/pins", json={"prompt": system}, timeout=10)
    assert reply.status_code == 200 and len(reply.json()["workers"]) == 3, reply.text
    noise_tokens = 0
    for index in range(4):
        # Each session's first turn: the system prompt, then its own question.
        before = settled(cluster)
        generate(cluster, system + [rng.randrange(3, 500) for _ in range(70)], f"pinned-{index}")
        after = settled(cluster)
        hits = total(after, "prefix_hit_tokens_total") - total(before, "prefix_hit_tokens_total")
        if index:
            assert hits >= len(system), f"session {index} missed the pinned prefix ({hits} tokens hit)"
        for _ in range(3):  # unpinned traffic: distinct long prompts, more than any pool holds
            noise = [rng.randrange(3, 500) for _ in range(400)]
            generate(cluster, noise)
            noise_tokens += len(noise)
    assert noise_tokens > 3 * PAGE * PAGES  # three times any worker's pool
    for entry in settled(cluster).values():
        if entry["role"] in ("prefill", "decode") and entry["pinned_pages_resident"]:
            assert (entry["pinned_pages"], entry["pinned_pages_resident"]) == (4, 4), entry
    resident = [e for e in cluster_status(cluster) if e["pinned_pages_resident"] == 4]
    assert any(e["role"] == "prefill" for e in resident) and any(e["role"] == "decode" for e in resident)


def test_killed_decode_worker_ends_its_sessions_cleanly(cluster: LocalCluster, offline: LLM) -> None:
    """Last in the module: it kills a decode worker for good."""
    rng = random.Random(4)
    history = [rng.randrange(3, 500) for _ in range(90)]
    for _ in range(2):
        history += generate(cluster, history, "conv-kill") + [rng.randrange(3, 500) for _ in range(20)]
    home = httpx.get(f"{cluster.http_url}/v1/sessions/conv-kill", timeout=5).json()["decode_worker"]
    other = "decode-1" if home == "decode-0" else "decode-0"
    before = settled(cluster, ("prefill-0", other))[other]
    cluster.kill(home)  # SIGKILL: the session's KV is gone with it
    out = generate(cluster, history, "conv-kill")  # at once: the router may still think it is up
    assert out == expected(offline, history)
    after = settled(cluster, ("prefill-0", other))[other]
    assert after["session_restores_total"] == before["session_restores_total"]  # a full prefill
    session = httpx.get(f"{cluster.http_url}/v1/sessions/conv-kill", timeout=5).json()
    assert (session["decode_worker"], session["moves"]) == (other, 1)
    history += out + [rng.randrange(3, 500) for _ in range(20)]
    response = httpx.post(f"{cluster.http_url}/v1/completions", headers={"X-Session-Id": "conv-kill"},
                          json={"prompt": history, "max_tokens": MAX_TOKENS, "temperature": 0,
                                "ignore_eos": True}, timeout=60)
    assert response.status_code == 200 and response.headers["X-Session-Id"] == "conv-kill"
    assert settled(cluster, ("prefill-0", other))[other]["session_restores_total"] == \
        after["session_restores_total"] + 1  # the session goes on, on its new worker
    assert httpx.delete(f"{cluster.http_url}/v1/sessions/conv-kill", timeout=5).json()["released_kv"]
    assert httpx.delete(f"{cluster.http_url}/v1/sessions/conv-kill", timeout=5).status_code == 404
