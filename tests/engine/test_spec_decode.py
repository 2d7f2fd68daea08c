"""Speculative decoding, greedy: with every drafter the output equals non-speculative
greedy output token for token (the independent reference: the same engine without
speculation), through chunked prefill, prefix hits, preemption, stops, aborts, overlap
scheduling and sessions; pages are all free or cached afterwards (target and draft)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from engine import LLM, Engine, SamplingParams
from engine.errors import ConfigError
from engine.spec.ngram import lookup


def _prompts(seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(400) for _ in range(n)] for n in (1, 5, 17, 40, 64, 90)]
    prompts[5] = prompts[4][:48] + prompts[5]  # shares a prefix
    prompts.append([7, 8, 9, 10, 11] * 8)  # repetitive: n-gram proposes from the prompt itself
    return prompts


def _params(max_tokens: int = 40) -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=max_tokens - 3 * i, ignore_eos=True) for i in range(7)]


def _generate(model, params: list[SamplingParams], prompts: list[list[int]] | None = None,  # noqa: ANN001
              **options) -> tuple[list[tuple[list[int], str | None]], Engine]:
    llm = LLM(model, **options)
    results = llm.generate(prompts or _prompts(), params)
    engine = llm.engine
    acct = engine.check_page_invariants()
    assert acct.free + acct.cached == acct.total and not engine.has_unfinished_requests()
    if engine.speculation is not None and engine.speculation.drafter.total_pages() is not None:
        assert engine.speculation.drafter.free_pages() == engine.speculation.drafter.total_pages()
    return [(r.outputs[0].token_ids, r.outputs[0].finish_reason) for r in results], engine


def test_ngram_lookup_finds_the_latest_longest_match() -> None:
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3])
    assert lookup(tokens, 3, 2) == [7, 5]  # suffix [2, 3]: its latest earlier occurrence is at 5
    assert lookup(tokens, 1, 3) == [7, 5, 2]  # suffix [3], latest earlier at 6
    assert lookup(np.array([4, 5, 6]), 3, 4) == []
    # Five tokens follow only the match of [2, 3] at 1; nine follow none: the earliest has the most.
    assert lookup(tokens, 3, 5) == [9, 1, 2, 3, 7]
    assert lookup(tokens, 3, 9) == [9, 1, 2, 3, 7, 5, 2, 3]
    assert lookup(np.array([5, 5]), 2, 3) == [5]  # one match, one token after it


def test_ngram_lookup_drafts_a_full_continuation_in_runs_and_cycles() -> None:
    """The latest match of a run's (or a short cycle's) suffix lies just behind the end;
    a match with a full draft after it is taken instead."""
    assert lookup(np.array([5] * 8), 3, 4) == [5, 5, 5, 5]
    cycle = np.array([8, 1, 2, 3] * 4 + [8, 1])
    assert lookup(cycle, 3, 5) == [2, 3, 8, 1, 2]
    assert lookup(np.array([9, 5, 5, 5, 5]), 2, 3) == [5, 5]  # no full draft: the earliest match


VARIANTS = {
    "default": {},
    "chunked": {"max_num_batched_tokens": 40},
    "small_batch_budget": {"max_num_seqs": 3, "page_size": 8, "max_num_batched_tokens": 10},
    "preemption": {"num_pages": 40, "page_size": 8, "max_num_batched_tokens": 96},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ngram_greedy_matches_non_speculative(loopy_model_path, variant: str) -> None:  # noqa: ANN001
    expected, reference = _generate(loopy_model_path, _params(), **VARIANTS[variant])
    for k in (1, 4):
        got, engine = _generate(loopy_model_path, _params(), speculative="ngram", num_speculative_tokens=k,
                                **VARIANTS[variant])
        assert got == expected
        stats = engine.speculation.stats
        # Real speculation happened, with both outcomes: accepted and rejected drafts.
        assert 0 < stats.accepted_tokens_total < stats.draft_tokens_total
        assert engine.counters.generated_tokens_total == reference.counters.generated_tokens_total
        if variant == "preemption":  # recomputes differ with the schedule: only outputs must match
            assert engine.scheduler.num_preemptions > 0
        else:
            assert engine.counters.prefill_tokens_total == reference.counters.prefill_tokens_total


def test_draft_model_greedy_matches_non_speculative(tiny_model_path, small_draft_path) -> None:  # noqa: ANN001
    expected, _ = _generate(tiny_model_path, _params())
    # The target itself as its draft: every draft is accepted (all K + 1 tokens a step).
    got, engine = _generate(tiny_model_path, _params(), speculative="draft", num_speculative_tokens=3,
                            speculative_draft_model=str(tiny_model_path))
    assert got == expected
    stats = engine.speculation.stats
    assert stats.accepted_tokens_total == stats.draft_tokens_total > 0
    assert stats.acceptance_length_counts[4] > 0
    # A different 1-layer draft: mostly rejected, still exact.
    got, engine = _generate(tiny_model_path, _params(), speculative="draft", num_speculative_tokens=3,
                            speculative_draft_model=str(small_draft_path), num_pages=60, page_size=8)
    assert got == expected
    assert engine.speculation.stats.accepted_tokens_total < engine.speculation.stats.draft_tokens_total


def test_stops_inside_accepted_drafts_match(tiny_model_path) -> None:  # noqa: ANN001
    """Stop tokens, stop strings and max_tokens that fall among a step's accepted drafts."""
    reference, _ = _generate(tiny_model_path, _params())
    params = _params()
    params[1] = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[reference[1][0][6]], ignore_eos=True)
    llm = LLM(tiny_model_path)
    text = llm.engine.tokenizer.decode(reference[2][0][:12])
    params[2] = SamplingParams(temperature=0, max_tokens=30, stop=[text[-3:]], ignore_eos=True)
    params[3] = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected, _ = _generate(tiny_model_path, params)
    got, _ = _generate(tiny_model_path, params, speculative="draft", num_speculative_tokens=4,
                       speculative_draft_model=str(tiny_model_path))
    assert got == expected
    assert got[1][1] == "stop" and len(got[3][0]) == 5


def test_logprobs_and_penalties_match(loopy_model_path) -> None:  # noqa: ANN001
    """Greedy with logprobs and a repetition penalty: the row-by-row verify path (each
    row's penalty sees the drafts accepted before it)."""
    params = [SamplingParams(temperature=0, max_tokens=30, logprobs=2, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, frequency_penalty=0.5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    prompts = _prompts()[4:]
    llm = LLM(loopy_model_path)
    expected = llm.generate(prompts, params)
    spec = LLM(loopy_model_path, speculative="ngram", num_speculative_tokens=3)
    got = spec.generate(prompts, params)
    for a, b in zip(expected, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    lp_a, lp_b = expected[0].outputs[0].logprobs, got[0].outputs[0].logprobs
    assert [e.token_id for e in lp_a] == [e.token_id for e in lp_b]
    assert np.allclose([e.logprob for e in lp_a], [e.logprob for e in lp_b], atol=1e-4)
    assert spec.engine.speculation.stats.accepted_tokens_total > 0


def test_overlap_schedule_with_speculation_matches(loopy_model_path, tiny_model_path) -> None:  # noqa: ANN001
    expected, _ = _generate(loopy_model_path, _params())
    got, engine = _generate(loopy_model_path, _params(), speculative="ngram", num_speculative_tokens=3,
                            overlap_schedule=True)
    assert got == expected and engine.speculation.stats.accepted_tokens_total > 0
    expected, _ = _generate(tiny_model_path, _params())
    got, _ = _generate(tiny_model_path, _params(), speculative="draft", num_speculative_tokens=2,
                       speculative_draft_model=str(tiny_model_path), overlap_schedule=True)
    assert got == expected


def _run(engine: Engine, prompt: list[int], params: SamplingParams, session: str) -> list[int]:
    rid = engine.add_request(prompt, params, session_id=session)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        tokens += [t for out in engine.step() if out.request_id == rid for t in out.new_token_ids]
    engine.check_page_invariants()
    return tokens


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sessions_with_speculation_match(loopy_model_path, method: str) -> None:  # noqa: ANN001
    """Two turns of a session: the second starts from the first's kept KV (whose last
    page held rejected drafts' garbage past the computed tokens)."""
    options = {"speculative": method, "num_speculative_tokens": 3, "page_size": 4, "num_pages": 128}
    if method == "draft":
        options["speculative_draft_model"] = str(loopy_model_path)
    params = SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)
    turns = []
    for opts in ({"page_size": 4, "num_pages": 128}, options):
        engine = Engine(loopy_model_path, **opts)
        first = _prompts()[3]
        out1 = _run(engine, first, params, "s")
        out2 = _run(engine, first + out1 + [5, 6, 7], params, "s")
        turns.append((out1, out2, engine.scheduler.sessions.restores_total))
    assert turns[0] == turns[1] and turns[1][2] == 1


def test_abort_frees_target_and_draft_pages(tiny_model_path) -> None:  # noqa: ANN001
    engine = Engine(tiny_model_path, speculative="draft", num_speculative_tokens=3,
                    speculative_draft_model=str(tiny_model_path))
    ids = [engine.add_request(p, s) for p, s in zip(_prompts(), _params())]
    for _ in range(4):
        engine.step()
    assert engine.speculation.drafter.free_pages() < engine.speculation.drafter.total_pages()
    for rid in ids[:3]:
        assert engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    engine.free_cache()
    assert engine.page_accounting().free == engine.config.num_pages
    assert engine.speculation.drafter.free_pages() == engine.speculation.drafter.total_pages()


def test_remote_prefill_then_speculative_decode(tiny_model_path) -> None:  # noqa: ANN001
    """PD without a network: the decode engine's draft model prefills the prompt itself
    when the request resumes (the prefill engine runs no draft)."""
    prompt, params = _prompts()[4], SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    expected, _ = _generate(tiny_model_path, [params], [prompt])
    prefill = Engine(tiny_model_path)
    decode = Engine(tiny_model_path, speculative="draft", num_speculative_tokens=3,
                    speculative_draft_model=str(tiny_model_path))
    reservation = decode.reserve_remote(prompt, params, "r")
    prefill.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), "r", hold_pages=True)
    first = next(o for o in iter(prefill.step, None) if o)
    for src, dst in zip(prefill.request_pages("r")[reservation.start_page:], reservation.page_ids):
        decode.kv_cache.buffer[dst].copy_(prefill.kv_cache.buffer[src])
    prefill.release_held("r")
    out = decode.resume_remote("r", first[0].new_token_ids[0])
    tokens = list(out.new_token_ids)
    while decode.has_unfinished_requests():
        tokens += [t for o in decode.step() for t in o.new_token_ids]
    assert tokens == expected[0][0]
    assert decode.speculation.stats.accepted_tokens_total == decode.speculation.stats.draft_tokens_total > 0


def test_bad_speculative_settings_are_refused(tiny_model_path, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        Engine(tiny_model_path, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ConfigError, match="unknown speculative method 'medusa'"):
        Engine(tiny_model_path, speculative="medusa")
    with pytest.raises(ConfigError, match="needs speculative_draft_model"):
        Engine(tiny_model_path, speculative="draft")
    with pytest.raises(ConfigError, match="draft model directory not found"):
        Engine(tiny_model_path, speculative="draft", speculative_draft_model=str(tmp_path / "nope"))
    from bench.presets import write_model_dir
    other = write_model_dir("llama-3.2-1b", tmp_path / "big-vocab")
    with pytest.raises(ConfigError, match="vocab_size 128256; the target model has 512"):
        Engine(tiny_model_path, speculative="draft", speculative_draft_model=str(other), load_format="dummy")
    from tests.engine.spec_models import write_small_draft
    renamed = write_small_draft(tmp_path / "other-tokenizer")
    tokenizer = (renamed / "tokenizer.json").read_text().replace('"<|eot_id|>"', '"<|eot|>"')
    (renamed / "tokenizer.json").write_text(tokenizer)
    with pytest.raises(ConfigError, match="different tokenizer"):
        Engine(tiny_model_path, speculative="draft", speculative_draft_model=str(renamed))
