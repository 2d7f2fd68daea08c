"""Overlap scheduling produces exactly what the synchronous loop produces, through
chunked prefill, prefix hits, preemption, stop tokens, aborts and non-greedy fallbacks."""
from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams

VARIANTS = {
    "default": {},
    "chunked": {"max_num_batched_tokens": 40},
    "prefix_and_small_batch": {"max_num_seqs": 3, "page_size": 8},
    "preemption": {"num_pages": 40, "page_size": 8, "max_num_batched_tokens": 96},
}


def _prompts(seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(400) for _ in range(n)] for n in (1, 5, 17, 40, 64, 90, 33, 120)]
    prompts[6] = prompts[5][:60] + prompts[6]  # shares a prefix
    return prompts


def _params() -> list[SamplingParams]:
    lengths = [12, 3, 20, 1, 16, 9, 14, 20]
    return [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]


def _generate(tiny_model_path, overlap: bool, params: list[SamplingParams], **options):  # noqa: ANN001, ANN202
    llm = LLM(tiny_model_path, overlap_schedule=overlap, **options)
    results = llm.generate(_prompts(), params)
    acct = llm.engine.check_page_invariants()
    assert acct.free + acct.cached == acct.total and not llm.engine.has_unfinished_requests()
    return [(r.outputs[0].token_ids, r.outputs[0].finish_reason) for r in results], llm.engine


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_overlap_matches_synchronous(tiny_model_path, variant: str) -> None:  # noqa: ANN001
    expected, reference = _generate(tiny_model_path, False, _params(), **VARIANTS[variant])
    got, engine = _generate(tiny_model_path, True, _params(), **VARIANTS[variant])
    assert got == expected
    # Workers export these counters: the overlapped loop counts what the synchronous one does.
    assert engine.counters.generated_tokens_total == reference.counters.generated_tokens_total \
        == sum(len(tokens) for tokens, _ in got)
    assert engine.counters.prefill_tokens_total == reference.counters.prefill_tokens_total > 0
    assert engine.overlap is not None and engine.overlap.timings.steps > 0
    if variant == "preemption":
        assert engine.scheduler.num_preemptions > 0


def test_overlap_stops_on_tokens_and_falls_back_for_sampling(tiny_model_path) -> None:  # noqa: ANN001
    reference, _ = _generate(tiny_model_path, False, _params())
    stop_at = reference[2][0][4]  # a token that prompt 2 greedily produces 5th
    params = _params()
    params[2] = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at], ignore_eos=True)
    params[5] = SamplingParams(temperature=0.8, seed=7, max_tokens=9, ignore_eos=True)
    params[7] = SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True)
    expected, _ = _generate(tiny_model_path, False, params)
    got, _ = _generate(tiny_model_path, True, params)
    assert got == expected
    assert got[2][1] == "stop" and got[2][0][-1] == stop_at


def test_overlap_abort_while_in_flight(tiny_model_path) -> None:  # noqa: ANN001
    llm = LLM(tiny_model_path, overlap_schedule=True)
    engine = llm.engine
    ids = [engine.add_request(p, s) for p, s in zip(_prompts(), _params())]
    for _ in range(3):
        engine.step()
    assert engine.abort_request(ids[4])
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != ids[4]
    engine.free_cache()
    assert engine.page_accounting().free == engine.config.num_pages


def test_overlap_stop_strings_and_context_limit_match_synchronous(tiny_model_path) -> None:  # noqa: ANN001
    # Stop checks read a token while a newer placeholder follows it: stop strings (which
    # decode the output list) and the context limit must see only the tokens read so far.
    prompts = _prompts()
    plain = LLM(tiny_model_path, max_model_len=130).generate(
        prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    params = []
    for i, result in enumerate(plain):
        text = result.outputs[0].text
        stop = [text[len(text) // 2:len(text) // 2 + 3]] if i in (1, 3, 5) else []
        params.append(SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop))
    results = {}
    for overlap in (False, True):
        llm = LLM(tiny_model_path, max_model_len=130, overlap_schedule=overlap)
        outs = [r.outputs[0] for r in llm.generate(prompts, params)]
        results[overlap] = [(o.token_ids, o.finish_reason, o.text) for o in outs]
        assert llm.engine.check_page_invariants().held_by_requests == 0
    assert results[True] == results[False]
    reasons = [reason for _, reason, _ in results[False]]
    assert "stop" in reasons and "length" in reasons
    assert len(results[False][7][0]) == 130 - len(prompts[7])  # cut by the context, not max_tokens
