"""Engine hooks for disaggregation, without a network: one engine prefills with
`hold_pages`, its pages are copied into another engine's reserved pages, and the second
continues decoding. Greedy output must equal a single aggregated engine's."""
from __future__ import annotations

import random

import pytest

from engine import LLM, Engine, SamplingParams


def _prefill_then_decode(prefill: Engine, decode: Engine, prompt: list[int], params: SamplingParams,
                         rid: str) -> list[int]:
    reservation = decode.reserve_remote(prompt, params, rid)
    assert reservation is not None
    first_only = SamplingParams(**{**params.__dict__, "max_tokens": 1, "ignore_eos": True, "stop": ()})
    prefill.add_request(prompt, first_only, rid, hold_pages=True)
    first = None
    while first is None:
        first = next((o for o in prefill.step() if o.request_id == rid), None)
    assert first.finished
    src_pages = prefill.request_pages(rid)[reservation.start_page:]
    assert len(src_pages) == len(reservation.page_ids)
    for src, dst in zip(src_pages, reservation.page_ids):
        decode.kv_cache.buffer[dst].copy_(prefill.kv_cache.buffer[src])
    prefill.release_held(rid)
    out = decode.resume_remote(rid, first.new_token_ids[0])
    tokens = list(out.new_token_ids)
    while not out.finished:
        out = next(o for o in decode.step() if o.request_id == rid)
        tokens += out.new_token_ids
    return tokens


@pytest.mark.parametrize("chunk", [2048, 24])
def test_remote_prefill_matches_aggregated(tiny_model_path, chunk: int) -> None:  # noqa: ANN001
    rng = random.Random(7)
    shared = [rng.randrange(500) for _ in range(70)]
    prompts = [shared + [rng.randrange(500) for _ in range(n)] for n in (1, 9, 33, 100)] + [[5, 6, 7]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    expected = [r.outputs[0].token_ids for r in LLM(tiny_model_path, page_size=8).generate(prompts, params)]
    prefill = Engine(tiny_model_path, page_size=8, max_num_batched_tokens=chunk)
    decode = Engine(tiny_model_path, page_size=8)
    got = [_prefill_then_decode(prefill, decode, p, params, f"r{i}") for i, p in enumerate(prompts)]
    assert got == expected
    # Decode's own prefix cache served the shared prefix for later prompts.
    assert decode.scheduler.prefix_hit_tokens_total >= 64
    assert prefill.counters.prefill_tokens_total < sum(len(p) for p in prompts)  # prefill cache hits too
    for engine in (prefill, decode):
        acct = engine.check_page_invariants()
        assert acct.held_by_requests == 0 and acct.free + acct.cached == acct.total


def test_reserve_remote_refuses_when_pool_is_short(tiny_model_path) -> None:  # noqa: ANN001
    decode = Engine(tiny_model_path, page_size=8, num_pages=10)
    params = SamplingParams(max_tokens=4)
    assert decode.reserve_remote(list(range(1, 60)), params, "a") is not None  # 8 pages
    assert decode.reserve_remote(list(range(1, 40)), params, "b") is None  # 5 more do not fit
    assert "b" not in decode.requests
    assert decode.abort_request("a")
    acct = decode.check_page_invariants()
    assert acct.free == 10 and acct.cached == 0
