"""Sessions in the engine (engine/sessions.py): a finished turn's KV stays with its
session, the next turn restores it and computes only its new tokens, greedy outputs
equal a run without sessions, and holds are bounded (cap, idle timeout, close, memory
pressure before any request waits). Page ids are exact: a fresh pool hands out 0, 1, 2..."""
from __future__ import annotations

import random

import pytest

from engine import Engine, SamplingParams
from engine.errors import InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


def run(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY, session: str = "",
        rid: str | None = None) -> list[int]:
    """Generate one request to its end; its output tokens."""
    rid = engine.add_request(prompt, params, rid, session_id=session)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        tokens += [t for out in engine.step() if out.request_id == rid for t in out.new_token_ids]
    engine.check_page_invariants()
    return tokens


def computed_by(engine: Engine, prompt: list[int], session: str, params: SamplingParams = GREEDY) -> tuple[list[int], int]:
    before = engine.counters.prefill_tokens_total
    out = run(engine, prompt, params, session)
    return out, engine.counters.prefill_tokens_total - before


@pytest.fixture
def engine(tiny_model_path) -> Engine:  # noqa: ANN001
    return Engine(tiny_model_path, page_size=4, num_pages=32)


def test_a_turn_restores_the_last_one_with_exact_pages(engine: Engine) -> None:
    prompt = list(range(10, 20))  # 10 tokens: pages 0, 1 full, page 2 holds tokens 8-9
    out = run(engine, prompt, session="s")
    # 11 tokens computed (the last output's KV is not): pages 0, 1 cached and held, page 2 the tail.
    hold = engine.scheduler.sessions._holds["s"]
    assert ([n.page for n in hold.nodes], hold.tail_page, len(hold.token_ids)) == ([0, 1], 2, 11)
    acct = engine.check_page_invariants()
    assert (acct.cached, acct.evictable, acct.held_by_sessions, acct.free) == (2, 0, 1, 29)
    turn2 = prompt + out + [30, 31, 32, 33, 34]  # 17 tokens
    rid = engine.add_request(turn2, GREEDY, session_id="s")
    engine.step()
    request = engine.requests[rid]
    assert request.pages == [0, 1, 2, 3, 4] and request.num_cached_tokens == 11
    assert engine.counters.prefill_tokens_total == 10 + 6  # only tokens 11..16 computed
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.sessions.restores_total == 1


def test_ten_turns_compute_only_their_new_tokens_and_equal_a_run_without_sessions(tiny_model_path) -> None:  # noqa: ANN001
    rng = random.Random(3)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    with_sessions = Engine(tiny_model_path, page_size=4, num_pages=128)
    plain = Engine(tiny_model_path, page_size=4, num_pages=128, enable_prefix_cache=False)
    history = [rng.randrange(3, 500) for _ in range(37)]  # the system prompt
    last_held = 0
    for turn in range(10):
        history += [rng.randrange(3, 500) for _ in range(rng.randrange(3, 12))]  # the user's message
        out, computed = computed_by(with_sessions, history, "chat", params)
        assert out == run(plain, history, params)  # the same greedy tokens, token for token
        assert computed == len(history) - last_held  # new tokens (+ the last reply token)
        last_held = len(history) + len(out) - 1
        history += out
    sessions = with_sessions.scheduler.sessions
    assert sessions.restores_total == 9 and sessions.open == 1
    assert plain.counters.prefill_tokens_total > 3 * with_sessions.counters.prefill_tokens_total


def test_a_prompt_that_diverges_inside_the_held_pages_falls_back_to_the_tree(engine: Engine) -> None:
    prompt = list(range(10, 30))
    out = run(engine, prompt, session="s")
    edited = prompt[:6] + [99] + prompt[7:] + out + [5, 6]  # an edited history: page 1 differs
    before = engine.counters.prefill_tokens_total
    run(engine, edited, session="s")
    sessions = engine.scheduler.sessions
    assert sessions.releases["diverged"] == 1 and sessions.restores_total == 0
    assert engine.counters.prefill_tokens_total - before == len(edited) - 4  # page 0 came from the cache


def test_memory_pressure_releases_holds_after_the_cache_and_before_any_wait(tiny_model_path) -> None:  # noqa: ANN001
    engine = Engine(tiny_model_path, page_size=4, num_pages=12)
    run(engine, list(range(10, 20)), session="a")  # holds pages 0, 1 (cached) and 2 (tail)
    run(engine, list(range(40, 48)), params=SamplingParams(temperature=0, max_tokens=1))  # pages 3, 4 cached, unheld
    sessions = engine.scheduler.sessions
    run(engine, list(range(100, 130)), params=SamplingParams(temperature=0, max_tokens=1))  # needs 8 pages
    assert sessions.open == 1 and sessions.releases["pressure"] == 0  # free + unheld cache sufficed
    run(engine, list(range(200, 240)), params=SamplingParams(temperature=0, max_tokens=1))  # needs 10 pages: more than free + unheld cache
    assert sessions.open == 0 and sessions.releases["pressure"] == 1
    assert engine.scheduler.num_preemptions == 0


def test_holds_are_capped_least_recently_used_first_and_expire_when_idle(tiny_model_path) -> None:  # noqa: ANN001
    engine = Engine(tiny_model_path, page_size=4, num_pages=64, max_sessions=2, session_idle_timeout_s=10)
    sessions = engine.scheduler.sessions
    now = [0.0]
    sessions.clock = lambda: now[0]
    for name in ("a", "b", "c"):
        run(engine, [ord(name) + i for i in range(9)], session=name)
        now[0] += 1
    assert sessions.releases["evicted"] == 1 and not engine.close_session("a")
    now[0] = 11.5  # "b" (stored at 1) is idle for 10.5 s, "c" (at 2) for 9.5 s
    assert engine.expire_sessions() == 1 and sessions.open == 1
    assert engine.close_session("c") and sessions.open == 0
    acct = engine.check_page_invariants()
    assert acct.held_by_sessions == 0 and acct.evictable == acct.cached


def test_aborted_turns_keep_nothing_and_ids_are_checked(engine: Engine) -> None:
    rid = engine.add_request(list(range(10, 30)), SamplingParams(max_tokens=20), session_id="s")
    engine.step()
    engine.abort_request(rid)
    assert engine.scheduler.sessions.open == 0
    for bad, message in (("x" * 129, "at most 128"), ("a b", "only ASCII"), ("é", "only ASCII")):
        with pytest.raises(InvalidRequestError, match=message):
            engine.add_request([1, 2, 3], GREEDY, session_id=bad)
    assert not engine.requests and not engine.scheduler.waiting


def test_remote_reservation_after_a_restore_covers_only_the_new_pages(engine: Engine) -> None:
    prompt = list(range(10, 20))
    out = run(engine, prompt, session="s")
    turn2 = prompt + out + list(range(50, 60))  # 22 tokens; 11 restored
    assert engine.cached_prefix_tokens(turn2, session_id="s") == 11
    reservation = engine.reserve_remote(turn2, GREEDY, "r2", session_id="s")
    assert reservation is not None
    assert (reservation.start_page, reservation.page_ids) == (2, [2, 3, 4, 5])  # tail page 2, then new ones
