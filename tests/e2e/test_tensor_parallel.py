"""Prefill and decode at different tensor-parallel sizes, as real worker processes behind
a real router, KV over the tcp backend: prefill at TP=1 feeding decode at TP=2 and
prefill at TP=2 feeding decode at TP=1 both give the aggregated TP=1 output token for
token. Then the ranks' lifetimes: a TP worker stopped with SIGTERM exits 0 and takes its
rank with it; a rank killed under a running worker makes the worker exit 1, saying so."""
from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from proto import epd_pb2 as pb
from tests.e2e.cluster import by_role, grpc_generate, make_cluster, wait_settled
from tests.procs import child_pids, wait_gone

pytestmark = pytest.mark.timeout(300)
# Small pages and chunks: a prompt ships in several chunks, and through more than one
# round of the staging area (49 pages at most per round: 48 tokens / 8 + 1).
ENGINE = ("--page-size", "8", "--num-pages", "256", "--max-num-batched-tokens", "48")
# Four processes (router, prefill, decode, one more rank) share the CI machine's cores:
# one torch thread each keeps their OpenMP threads from spinning against each other.
ENV = {"OMP_NUM_THREADS": "1"}


def _workload() -> list[tuple[list[int], int]]:
    rng = random.Random(18)
    shared = [rng.randrange(3, 500) for _ in range(70)]
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (2, 9, 40, 130, 300)]
    prompts += [shared + [rng.randrange(3, 500) for _ in range(n)] for n in (5, 50)]
    return [(prompt, 4 + index % 5) for index, prompt in enumerate(prompts)]


@pytest.fixture(scope="module")
def expected(tiny_model_path) -> list[list[int]]:  # noqa: ANN001
    work = _workload()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(tiny_model_path, page_size=8, num_pages=256, max_num_batched_tokens=48)
        results = llm.generate([p for p, _ in work], [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                                                       for _, m in work])
    finally:
        torch.set_num_threads(threads)
    return [r.outputs[0].token_ids for r in results]


async def _run(address: str) -> list[list[int]]:
    async def one(prompt: list[int], max_tokens: int) -> list[int]:
        sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return (await grpc_generate(address, prompt, sampling))[0]

    return list(await asyncio.gather(*(one(p, m) for p, m in _workload())))


def _tp(size: int) -> tuple[str, ...]:
    return ("--tensor-parallel-size", str(size))


def _check_disaggregated(cluster, expected: list[list[int]]) -> None:  # noqa: ANN001
    assert asyncio.run(_run(cluster.grpc_address)) == expected
    status = wait_settled(cluster)  # the prompts were prefilled remotely, their KV arrived
    (prefill,), (decode,) = by_role(status, "prefill"), by_role(status, "decode")
    assert 0 < prefill["kv_bytes_sent_total"] == decode["kv_bytes_received_total"]


def test_prefill_tp1_into_decode_tp2_and_sigterm_stops_the_ranks(tmp_path: Path, expected) -> None:  # noqa: ANN001
    with make_cluster(tmp_path, env=ENV, worker_args=ENGINE, decode_args=_tp(2), local_prefill_threshold=1) as cluster:
        _check_disaggregated(cluster, expected)
        decode = cluster.processes["decode-0"]
        (rank1,) = child_pids(decode.pid)
        decode.send_signal(signal.SIGTERM)  # drain (nothing runs), stop, exit
        assert decode.wait(timeout=30) == 0
        wait_gone(rank1, 10)
        assert "tensor-parallel rank 1 stopping after" in (tmp_path / "logs" / "decode-0.log").read_text()


def test_prefill_tp2_into_decode_tp1_and_a_dead_rank_fails_the_worker(tmp_path: Path, expected) -> None:  # noqa: ANN001
    with make_cluster(tmp_path, env=ENV, worker_args=ENGINE, prefill_args=_tp(2), local_prefill_threshold=1) as cluster:
        _check_disaggregated(cluster, expected)
        prefill = cluster.processes["prefill-0"]
        (rank1,) = child_pids(prefill.pid)
        os.kill(rank1, signal.SIGKILL)
        assert prefill.wait(timeout=30) == 1  # loudly: not up with an engine that cannot step
        log = (tmp_path / "logs" / "prefill-0.log").read_text()
        assert "tensor-parallel rank 1" in log and "exited with code -9" in log
