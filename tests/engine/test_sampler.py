"""Sampling: filters on constructed distributions, seeded reproducibility independent of
batch composition, and logprobs against transformers' log_softmax."""
from __future__ import annotations

import math

import pytest
import torch

from engine import LLM, SamplingParams
from engine.request import Request
from engine.sampler import Sampler, apply_penalties, filter_logits
from tests.engine.hf_models import load_hf, save_hf_checkpoint

PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
LOGITS = PROBS.log()


def _kept(params: SamplingParams) -> set[int]:
    out = filter_logits(LOGITS.clone(), params)
    return {i for i, v in enumerate(out.tolist()) if v != float("-inf")}


def test_top_k_keeps_k_most_likely() -> None:
    assert _kept(SamplingParams(top_k=1)) == {0}
    assert _kept(SamplingParams(top_k=3)) == {0, 1, 2}
    assert _kept(SamplingParams(top_k=6)) == set(range(6))


@pytest.mark.parametrize("top_p, expected", [(0.39, {0}), (0.41, {0, 1}), (0.64, {0, 1}),
                                             (0.66, {0, 1, 2}), (0.9, {0, 1, 2, 3}), (1.0, set(range(6)))])
def test_top_p_keeps_smallest_prefix_reaching_mass(top_p: float, expected: set[int]) -> None:
    assert _kept(SamplingParams(top_p=top_p)) == expected


@pytest.mark.parametrize("min_p, expected", [(0.09, {0, 1, 2, 3, 4, 5}), (0.11, {0, 1, 2, 3, 4}), (0.2, {0, 1, 2, 3}),
                                             (0.5, {0, 1}), (0.9, {0})])
def test_min_p_drops_tokens_below_fraction_of_max(min_p: float, expected: set[int]) -> None:
    assert _kept(SamplingParams(min_p=min_p)) == expected


def test_temperature_sharpens_distribution() -> None:
    cold = torch.softmax(filter_logits(LOGITS.clone(), SamplingParams(temperature=0.5)), -1)
    assert cold[0] > PROBS[0] and math.isclose(float(cold.sum()), 1.0, rel_tol=1e-6)
    expected = PROBS**2 / (PROBS**2).sum()
    assert torch.allclose(cold, expected, atol=1e-6)


def test_sampled_tokens_stay_inside_filtered_set() -> None:
    sampler = Sampler(seed=0)
    # top-k first, then top-p over the renormalised top 3 (0.5, 0.3125, 0.1875).
    params = SamplingParams(top_k=3, top_p=0.6)
    request = Request("r", [1, 2], params)
    seen = {sampler.sample(LOGITS[None].clone(), [request])[0][0] for _ in range(300)}
    assert seen == {0, 1}


def test_sample_frequencies_follow_probabilities() -> None:
    sampler = Sampler(seed=3)
    request = Request("r", [1], SamplingParams(temperature=1.0))
    counts = torch.zeros(6)
    for _ in range(4000):
        counts[sampler.sample(LOGITS[None].clone(), [request])[0][0]] += 1
    assert torch.allclose(counts / counts.sum(), PROBS, atol=0.03)


def test_penalties() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    request = Request("r", [0, 1], SamplingParams(repetition_penalty=2.0))
    assert apply_penalties(logits.clone(), request).tolist() == [1.0, -4.0, 1.0, 0.5]
    request = Request("r", [3], SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    request.output_token_ids = [2, 2, 0]
    assert apply_penalties(logits.clone(), request).tolist() == [1.25, -2.0, -0.25, 0.5]


@pytest.fixture(scope="module")
def llm(tiny_model_path) -> LLM:  # noqa: ANN001
    return LLM(tiny_model_path)


def test_seeded_sampling_reproducible_and_batch_independent(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=1234, ignore_eos=True)
    alone = llm.generate("Tell me a story", params)[0].outputs[0].token_ids
    again = llm.generate("Tell me a story", params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 3
    batch = llm.generate(["Hello", "Tell me a story", "The capital of France", "x" * 50],
                         [others[0], params, others[1], others[2]])
    assert alone == again
    assert batch[1].outputs[0].token_ids == alone
    different = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=99, ignore_eos=True)
    assert llm.generate("Tell me a story", different)[0].outputs[0].token_ids != alone


def test_seeded_sampling_survives_preemption(tiny_model_path) -> None:  # noqa: ANN001
    params = [SamplingParams(temperature=0.8, max_tokens=40, seed=s, ignore_eos=True) for s in range(6)]
    prompts = [list(range(10 + i, 90 + i)) for i in range(6)]
    roomy = LLM(tiny_model_path).generate(prompts, params)
    tight_llm = LLM(tiny_model_path, num_pages=24, page_size=8)
    tight = tight_llm.generate(prompts, params)
    assert tight_llm.engine.scheduler.num_preemptions > 0
    assert [r.outputs[0].token_ids for r in tight] == [r.outputs[0].token_ids for r in roomy]


def test_logprobs_equal_log_softmax_of_reference(tmp_path) -> None:  # noqa: ANN001
    path = save_hf_checkpoint("llama", tmp_path / "model", seed=5)
    hf = load_hf(path)
    prompt = list(range(30, 75))
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=4, ignore_eos=True)
    result = LLM(path).generate(prompt, params)[0].outputs[0]
    assert result.logprobs is not None and len(result.logprobs) == 5
    sequence = list(prompt)
    for entry, token in zip(result.logprobs, result.token_ids):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([sequence])).logits[0, -1].double(), -1)
        assert entry.token_id == token == int(ref.argmax())
        assert math.isclose(entry.logprob, float(ref[token]), abs_tol=1e-4)
        values, ids = torch.topk(ref, 4)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert all(math.isclose(lp, float(v), abs_tol=1e-4) for (_, lp), v in zip(entry.top, values))
        sequence.append(token)


@pytest.mark.parametrize("kwargs", [dict(repetition_penalty=6.34e-274), dict(repetition_penalty=1e300),
                                    dict(repetition_penalty=5e-324, frequency_penalty=-2.0, presence_penalty=-2.0),
                                    dict(repetition_penalty=1e-300, top_p=0.5, min_p=0.9, top_k=2)])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e-5])
def test_extreme_penalties_never_make_a_bad_distribution(kwargs: dict, temperature: float) -> None:
    """Once a repetition penalty of 6e-274 overflowed the seen tokens' logits to inf and
    softmax made NaN of the row: the engine step failed for every request in the batch."""
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 30.0, -30.0])
    request = Request("r", [0, 1, 4, 5], SamplingParams(temperature=temperature, seed=3, **kwargs))
    request.output_token_ids = [4, 4, 2]
    token, _ = Sampler(0).sample(logits[None].clone(), [request])[0]
    assert 0 <= token < 6
