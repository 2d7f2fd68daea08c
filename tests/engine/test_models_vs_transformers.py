"""The engine against transformers on the same weights (float32): logits and greedy
generation, also with chunked prefill, prefix-cache hits and preemption."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import LLM, Engine, SamplingParams
from tests.engine.hf_models import load_hf, save_hf_checkpoint

ARCHS = ["llama", "qwen2", "qwen3"]
MAX_NEW = 32


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    arch = request.param
    return arch, save_hf_checkpoint(arch, tmp_path_factory.mktemp(arch) / "model", seed=ARCHS.index(arch))


@pytest.fixture(scope="module")
def hf_model(checkpoint: tuple[str, Path]):  # noqa: ANN201
    return load_hf(checkpoint[1])


def _prompts(seed: int = 1) -> list[list[int]]:
    """16 prompts of 1..300 tokens; some share long prefixes with others."""
    rng = random.Random(seed)
    lengths = [1, 2, 7, 15, 16, 17, 33, 64, 100, 150, 199, 240, 280, 300, 120, 90]
    prompts = [[rng.randrange(500) for _ in range(n)] for n in lengths]
    shared = prompts[13][:200]
    prompts[14] = shared[:96] + prompts[14][:24]  # shares 96 tokens with prompt 13
    prompts[15] = shared[:160] + prompts[15][:30]  # shares 160 tokens
    prompts[12] = shared + prompts[12][:80]  # extends prompt 13's first 200 tokens
    return prompts


@pytest.fixture(scope="module")
def hf_greedy(hf_model) -> list[list[int]]:  # noqa: ANN001
    outputs = []
    with torch.no_grad():
        for prompt in _prompts():
            ids = torch.tensor([prompt])
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                    do_sample=False)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_prefill_and_decode_logits_match(checkpoint, hf_model) -> None:  # noqa: ANN001
    engine = Engine(checkpoint[1], page_size=8, num_pages=256)
    prompts = [p for p in _prompts() if len(p) > 1][:6]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    sequences = {rid: list(p) for rid, p in zip(ids, prompts)}
    steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        assert engine.last_logits is not None and len(outputs) == engine.last_logits.shape[0]
        for out, logits in zip(outputs, engine.last_logits):
            with torch.no_grad():
                ref = hf_model(torch.tensor([sequences[out.request_id]])).logits[0, -1]
            assert _rel_err(logits, ref) <= 1e-4, (out.request_id, steps)
            sequences[out.request_id].append(out.new_token_ids[0])
        steps += 1
    assert steps == 6  # one prefill step, five decode steps
    engine.check_page_invariants()


VARIANTS = {
    "default": {},
    "chunked": {"max_num_batched_tokens": 48},
    "prefix_hits": {"max_num_seqs": 3, "page_size": 8},
    "preemption": {"num_pages": 48, "page_size": 8, "max_num_batched_tokens": 128},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generate_matches_transformers(checkpoint, hf_greedy, variant: str) -> None:  # noqa: ANN001
    llm = LLM(checkpoint[1], **VARIANTS[variant])
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    results = llm.generate(_prompts(), params)
    for index, (result, expected) in enumerate(zip(results, hf_greedy)):
        assert result.outputs[0].token_ids == expected, f"prompt {index} differs"
        assert result.outputs[0].finish_reason == "length"
    engine = llm.engine
    if variant == "prefix_hits":
        assert sum(r.num_cached_tokens for r in results) >= 96
    if variant == "preemption":
        assert engine.scheduler.num_preemptions > 0
    acct = engine.check_page_invariants()
    assert acct.free + acct.cached == acct.total
    engine.free_cache()
    assert engine.page_accounting().free == acct.total
