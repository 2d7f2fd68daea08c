"""Issue 17 through a real 1-prefill/1-decode cluster of separate processes: with
speculation on the decode worker (n-gram, or a draft model whose prompt KV the decode
worker computes itself), greedy outputs equal the offline non-speculative engine token
for token, drafts were really accepted (the decode worker's /metrics), and no page leaks."""
from __future__ import annotations

import asyncio
import random

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import LLM, SamplingParams
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from tests.e2e.cluster import by_role, grpc_generate, make_cluster, wait_settled

pytestmark = pytest.mark.timeout(300)


def _workload() -> list[tuple[list[int], int]]:
    rng = random.Random(17)
    work = [([rng.randrange(3, 500) for _ in range(n)], 12 + n % 20) for n in (3, 20, 41, 70, 130, 200, 260)]
    return work + [([9, 10, 11, 12] * 10, 25)]


async def _run_all(address: str, work: list[tuple[list[int], int]]):  # noqa: ANN202
    return await asyncio.gather(*(grpc_generate(address, p, pb.SamplingParams(max_tokens=m, temperature=0.0))
                                  for p, m in work))


async def _metrics_text(entry: dict) -> str:
    async with grpc.aio.insecure_channel(entry["address"]) as channel:
        status = await pb_grpc.DecodeWorkerStub(channel).Status(pb.StatusRequest(), timeout=5)
    return httpx.get(f"http://{status.metrics_address}/metrics", timeout=5).text


def _sample(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not exported")


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_one_by_one_cluster_with_speculation_matches_offline(tmp_path, loopy_model_path, method: str) -> None:  # noqa: ANN001
    work = _workload()
    expected = LLM(loopy_model_path).generate([p for p, _ in work],
                                              [SamplingParams(temperature=0, max_tokens=m) for _, m in work])
    flags = ("--speculative", method, "--num-speculative-tokens", "3")
    if method == "draft":  # the model itself as draft: every draft must be accepted
        flags += ("--speculative-draft-model", str(loopy_model_path))
    with make_cluster(tmp_path, num_prefill=1, num_decode=1, model=str(loopy_model_path), decode_args=flags,
                      local_prefill_threshold=0) as cluster:
        results = asyncio.run(_run_all(cluster.grpc_address, work))
        for index, ((tokens, _, finished), ref) in enumerate(zip(results, expected)):
            assert tokens == ref.outputs[0].token_ids, f"request {index}: tokens differ"
            assert finished.usage.completion_tokens == len(tokens)
        # The prompts were prefilled remotely; a page leak would time the wait out.
        status = wait_settled(cluster, pages_clean=True)
        text = asyncio.run(_metrics_text(by_role(status, "decode")[0]))
        drafted = _sample(text, "epd_worker_spec_draft_tokens_total")
        accepted = _sample(text, "epd_worker_spec_accepted_tokens_total")
        assert 0 < accepted <= drafted
        if method == "draft":
            assert accepted == drafted
        assert _sample(text, "epd_worker_spec_acceptance_length_count") > 0
        assert _sample(text, "epd_worker_spec_drafter_seconds_count") > 0
