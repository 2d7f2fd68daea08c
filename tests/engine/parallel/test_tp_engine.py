"""Tensor parallelism on CPU (gloo): TP=2 greedy output equals TP=1 token for token, on the
tiny model (untied LM head, 2 KV heads: one per rank) and on a random Qwen3 checkpoint
with a single KV head (replicated on both ranks) and a tied, unevenly split vocabulary;
TP=2 logits match transformers; the ranks stop with the engine, and a dead rank — a
follower or rank 0 itself — is noticed at once."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import LLM, Engine, SamplingParams
from engine.parallel.comm import TensorParallelError
from tests.engine.hf_models import load_hf, save_hf_config
from tests.procs import alive, wait_gone

pytestmark = pytest.mark.timeout(180)
VARIED = {"page_size": 8, "num_pages": 128, "max_num_batched_tokens": 48, "max_num_seqs": 4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # noqa: ANN202
    """The TP=1 references on one torch thread too, as each TP rank of a 2-core host runs
    (engine.parallel.launch.cpu_threads): the tiny model gains nothing from a second
    thread, and OpenMP threads spinning against the other rank's cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompts(seed: int = 0) -> list[list[int]]:
    """Lengths 1..150 (chunked at 48 tokens), two sharing a 64-token prefix (cache hits)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (1, 7, 16, 33, 100, 150)]
    return prompts + [prompts[5][:64] + [11, 12, 13], prompts[5][:64] + [14]]


def _greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [r.outputs[0].token_ids for r in llm.generate(prompts, params)]


def _greedy_with_hits(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """The last two prompts after the others finished: their shared prefix is cached."""
    return _greedy(llm, prompts[:-2]) + _greedy(llm, prompts[-2:])


def test_tiny_model_tp2_equals_tp1_and_stops_its_rank(tiny_model_path) -> None:  # noqa: ANN001
    prompts = _prompts()
    expected = _greedy_with_hits(LLM(tiny_model_path, **VARIED), prompts)
    llm = LLM(tiny_model_path, tensor_parallel_size=2, **VARIED)
    (follower,) = llm.engine.tp.processes
    assert _greedy_with_hits(llm, prompts) == expected
    assert llm.engine.scheduler.prefix_hit_tokens_total >= 64
    assert llm.engine.kv_cache.buffer.shape[4] == 1  # rank 0 holds one of the two KV heads
    llm.engine.check_page_invariants()
    llm.close()
    assert follower.returncode == 0  # it stopped on STOP, not killed
    assert not alive(follower.pid)
    llm.close()  # idempotent


def test_dummy_weights_are_the_tp1_weights_cut_and_a_dead_follower_fails_steps(tiny_model_path) -> None:  # noqa: ANN001
    options = {"load_format": "dummy", "num_pages": 32}
    prompts = _prompts()[:3]
    expected = _greedy(LLM(tiny_model_path, **options), prompts, 6)
    llm = LLM(tiny_model_path, tensor_parallel_size=2, **options)
    assert _greedy(llm, prompts, 6) == expected
    failures: list[str] = []
    llm.engine.tp.group.on_failure = lambda error: failures.append(str(error))  # what a worker listens to
    (follower,) = llm.engine.tp.processes
    os.kill(follower.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 1"):
        _greedy(llm, [[5, 6, 7]], 4)
    assert time.monotonic() - start < 10
    assert len(failures) == 1 and "rank 1" in failures[0]
    with pytest.raises(TensorParallelError):  # every later step fails too, without waiting
        _greedy(llm, [[5, 6, 7]], 4)
    llm.close()


@pytest.fixture(scope="module")
def qwen3_single_kv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Qwen3Config

    from engine.tiny import VOCAB_SIZE
    config = Qwen3Config(vocab_size=VOCAB_SIZE - 3, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    return save_hf_config(config, tmp_path_factory.mktemp("qwen3") / "model", seed=3, tag="qwen3-1kv")


@pytest.fixture(scope="module")
def qwen3_tp2(qwen3_single_kv: Path):  # noqa: ANN201
    with LLM(qwen3_single_kv, tensor_parallel_size=2, **VARIED) as llm:
        yield llm


def test_single_kv_head_tp2_equals_tp1(qwen3_single_kv: Path, qwen3_tp2: LLM) -> None:
    engine = qwen3_tp2.engine
    assert engine.tp.layout.kv_replicas == 2 and engine.kv_cache.buffer.shape[4] == 1
    assert engine.tp.layout.vocab_per_rank * 2 > engine.model_config.vocab_size  # the last shard is padded
    prompts = _prompts(1)
    assert _greedy_with_hits(qwen3_tp2, prompts) == _greedy_with_hits(LLM(qwen3_single_kv, **VARIED), prompts)
    engine.check_page_invariants()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_single_kv_head_tp2_logits_match_transformers(qwen3_single_kv: Path, qwen3_tp2: LLM) -> None:
    hf = load_hf(qwen3_single_kv)
    engine: Engine = qwen3_tp2.engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    sequences = {engine.add_request(p, params): list(p) for p in _prompts(2)[1:5]}
    checked = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        assert engine.last_logits is not None and engine.last_logits.shape[1] == engine.model_config.vocab_size
        for out, logits in zip(outputs, engine.last_logits):
            with torch.no_grad():
                ref = hf(torch.tensor([sequences[out.request_id]])).logits[0, -1]
            assert _rel_err(logits, ref) <= 1e-4, out.request_id
            sequences[out.request_id].append(out.new_token_ids[0])
            checked += 1
    assert checked == 16  # prefill and decode steps of four requests


RANK0 = """
import sys, time
from engine import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=2, num_pages=32)
print(*llm.engine.tp.pids, flush=True)
time.sleep(600)
"""


def test_followers_exit_when_rank0_is_killed(tiny_model_path, tmp_path: Path) -> None:  # noqa: ANN001
    root = str(Path(__file__).resolve().parents[3])
    rank0 = subprocess.Popen([sys.executable, "-c", RANK0, str(tiny_model_path)], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
    try:
        assert rank0.stdout is not None
        (pid,) = map(int, rank0.stdout.readline().split())
        assert alive(pid)
        rank0.kill()  # no cleanup of any kind runs
        rank0.wait()
        assert wait_gone(pid, 10) < 10  # its stdin (rank 0's pipe) closed: it left on its own
    finally:
        rank0.kill()
        rank0.wait()
