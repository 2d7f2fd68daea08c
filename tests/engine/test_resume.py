"""Resuming a request from prompt + the output it already has (what a decode worker does
with a request migrated from a failed one): the continuation equals an uninterrupted
run token for token, greedy and seeded, with penalties and stop rules counting the
resumed output; computed here or by another engine whose KV is copied in."""
from __future__ import annotations

import dataclasses
import random

import pytest

from engine import LLM, Engine, SamplingParams
from engine.errors import InvalidRequestError

PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
    "seeded": SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=14, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.7, seed=9, repetition_penalty=1.3, frequency_penalty=0.5,
                                presence_penalty=0.4, max_tokens=14, ignore_eos=True),
}


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 40, 97)]


def _run(engine: Engine, rid: str) -> list[int]:
    tokens: list[int] = []
    while True:
        for out in engine.step():
            if out.request_id == rid:
                tokens += out.new_token_ids
                if out.finished:
                    return tokens


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_resume_locally_continues_the_uninterrupted_output(tiny_model_path, kind: str) -> None:  # noqa: ANN001
    params = PARAMS[kind]
    full = [r.outputs[0].token_ids for r in LLM(tiny_model_path, page_size=8).generate(_prompts(), params)]
    engine = Engine(tiny_model_path, page_size=8, max_num_batched_tokens=32)
    for i, (prompt, expected) in enumerate(zip(_prompts(), full)):
        for split in (1, 7, 13):
            rid = f"{kind}-{i}-{split}"
            engine.add_request(prompt, params, rid, output_token_ids=expected[:split])
            assert _run(engine, rid) == expected[split:], (i, split)
    acct = engine.check_page_invariants()
    assert acct.held_by_requests == 0 and acct.free + acct.cached == acct.total


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_resume_through_a_remote_prefill(tiny_model_path, kind: str) -> None:  # noqa: ANN001
    """The prefill engine computes prompt + resumed output and samples the next token;
    its pages land in the decode engine's reservation, which continues."""
    params = PARAMS[kind]
    prompts = _prompts()
    full = [r.outputs[0].token_ids for r in LLM(tiny_model_path, page_size=8).generate(prompts, params)]
    prefill = Engine(tiny_model_path, page_size=8, max_num_batched_tokens=24)
    decode = Engine(tiny_model_path, page_size=8)
    for i, (prompt, expected) in enumerate(zip(prompts, full)):
        split, rid = 6, f"r{i}"
        done = expected[:split]
        reservation = decode.reserve_remote(prompt, params, rid, output_token_ids=done)
        assert reservation is not None
        first_only = dataclasses.replace(params, max_tokens=split + 1, ignore_eos=True, stop=())
        prefill.add_request(prompt, first_only, rid, hold_pages=True, output_token_ids=done)
        first = _run(prefill, rid)
        assert first == [expected[split]]
        src = prefill.request_pages(rid)[reservation.start_page:]
        assert len(src) == len(reservation.page_ids) == -(-(len(prompt) + split) // 8) - reservation.start_page
        for s, d in zip(src, reservation.page_ids):
            decode.kv_cache.buffer[d].copy_(prefill.kv_cache.buffer[s])
        prefill.release_held(rid)
        out = decode.resume_remote(rid, first[0])
        rest = out.new_token_ids + ([] if out.finished else _run(decode, rid))
        assert rest == expected[split:], i
    for engine in (prefill, decode):
        acct = engine.check_page_invariants()
        assert acct.held_by_requests == 0 and acct.free + acct.cached == acct.total


def test_resumed_output_keeps_stop_state(tiny_model_path) -> None:  # noqa: ANN001
    engine = Engine(tiny_model_path, page_size=8)
    prompt = [5, 6, 7, 8]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    full = LLM(tiny_model_path).generate([prompt], greedy)[0].outputs[0].token_ids
    # The last resumed token is a stop token: finished already, nothing queued.
    stop_at = dataclasses.replace(greedy, stop_token_ids=(full[3],))
    finish = engine.resumed_finish("a", prompt, stop_at, full[:4])
    assert finish is not None and finish.finish_reason == "stop" and finish.request.stop_reason == full[3]
    assert finish.new_token_ids == [] and "a" not in engine.requests
    # max_tokens counts the resumed tokens: 4 resumed of 6 leave 2.
    six = dataclasses.replace(greedy, max_tokens=6)
    assert engine.resumed_finish("b", prompt, six, full[:4]) is None
    engine.add_request(prompt, six, "b", output_token_ids=full[:4])
    assert _run(engine, "b") == full[4:6]
    assert engine.resumed_finish("c", prompt, six, full[:6]).finish_reason == "length"
    # A stop string completed across the resumed tokens and the next one ends it.
    text = engine.tokenizer.decode(full[:6])
    tail = engine.tokenizer.decode(full[:5])
    assert len(text) > len(tail) and text.find(text[len(tail) - 1:]) == len(tail) - 1
    stop = dataclasses.replace(greedy, stop=(text[len(tail) - 1:],))
    engine.add_request(prompt, stop, "d", output_token_ids=full[:5])
    assert _run(engine, "d") == [full[5]]


def test_bad_resume_is_refused(tiny_model_path) -> None:  # noqa: ANN001
    engine = Engine(tiny_model_path, page_size=8)
    params = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(InvalidRequestError, match="nothing to generate"):
        engine.add_request([1, 2, 3], params, "a", output_token_ids=[4, 5, 6, 7])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request([1, 2, 3], params, "b", output_token_ids=[10**9])
    assert not engine.requests
