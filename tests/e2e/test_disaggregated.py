"""Issue 3 acceptance through a real 2-prefill/2-decode cluster of separate processes:
200 greedy requests equal the offline engine token for token, every worker did its part,
and no page is leaked."""
from __future__ import annotations

import asyncio
import random

import pytest

from engine import LLM, SamplingParams
from proto import epd_pb2 as pb
from tests.e2e.cluster import (by_role, cluster_status, flush_worker_caches, grpc_generate, make_cluster, wait_for,
                               wait_settled)

pytestmark = pytest.mark.timeout(600)
CONTEXT = 1024


def _workload(seed: int = 0) -> list[tuple[list[int], int]]:
    """200 (prompt, max_tokens): lengths up to the context limit, a third sharing long prefixes."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 500) for _ in range(n)] for n in (300, 480, 640)]
    work = []
    for i in range(200):
        max_tokens = rng.randrange(1, 24)
        if i % 3 == 0:
            prefix = prefixes[i % 9 // 3]
            suffix = [rng.randrange(3, 500) for _ in range(rng.randrange(1, 120))]
            prompt = prefix + suffix
        else:
            length = rng.choice([1, 2, 5, 17, 40, 63, 64, 65, 128, 250, 511, 700, 900,
                                 CONTEXT - max_tokens - 1, CONTEXT - 1 - max_tokens])
            prompt = [rng.randrange(3, 500) for _ in range(length)]
        work.append((prompt[: CONTEXT - max_tokens], max_tokens))
    return work


async def _run_all(address: str, work: list[tuple[list[int], int]], concurrency: int):  # noqa: ANN202
    limit = asyncio.Semaphore(concurrency)

    async def one(prompt: list[int], max_tokens: int):  # noqa: ANN202
        async with limit:
            return await grpc_generate(address, prompt, pb.SamplingParams(max_tokens=max_tokens, temperature=0.0))

    return await asyncio.gather(*(one(p, m) for p, m in work))


def _usable(backend: str) -> bool:
    from kv_transfer import backend_availability
    return backend_availability().get(backend, "unknown") is None


@pytest.fixture(scope="module")
def expected(tiny_model_path):  # noqa: ANN001, ANN201
    work = _workload()
    return LLM(tiny_model_path).generate([p for p, _ in work],
                                         [SamplingParams(temperature=0, max_tokens=m) for _, m in work])


# UCX over TCP on loopback for NIXL: the network path, as between hosts.
TRANSFER_ENV = {"nixl": {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}, "mooncake": {"MC_LOG_LEVEL": "ERROR"}}


@pytest.mark.parametrize("transfer", ["tcp", "mooncake", "nixl"])
def test_two_by_two_cluster_matches_offline_engine(tmp_path, expected, transfer: str) -> None:  # noqa: ANN001
    if not _usable(transfer):
        pytest.skip(f"transfer backend {transfer} is not installed here")
    work = _workload()
    with make_cluster(tmp_path, num_prefill=2, num_decode=2, transfer=transfer,
                      env=TRANSFER_ENV.get(transfer, {})) as cluster:
        results = asyncio.run(_run_all(cluster.grpc_address, work, concurrency=32))
        for index, ((tokens, text, finished), ref) in enumerate(zip(results, expected)):
            assert tokens == ref.outputs[0].token_ids, f"request {index}: tokens differ"
            assert text == ref.outputs[0].text, f"request {index}: text differs"
            assert finished.usage.completion_tokens == len(tokens)
        status = wait_settled(cluster)
        assert len(by_role(status, "prefill")) == 2 and len(by_role(status, "decode")) == 2
        for entry in by_role(status, "prefill"):
            assert entry["prefill_tokens_total"] > 0, entry
            assert entry["kv_bytes_sent_total"] > 0, entry
        for entry in by_role(status, "decode"):
            assert entry["kv_bytes_received_total"] > 0, entry
        assert sum(e["kv_bytes_sent_total"] for e in status) == sum(e["kv_bytes_received_total"] for e in status)
        for entry in status:
            assert entry["running"] == 0 and entry["waiting"] == 0
            assert entry["kv_pages_free"] == entry["kv_pages_total"] - entry["kv_pages_cached"], entry
        asyncio.run(flush_worker_caches(status))
        wait_for(lambda: all(e["kv_pages_free"] == e["kv_pages_total"] for e in cluster_status(cluster)), 10)
