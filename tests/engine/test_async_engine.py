"""AsyncEngine: a failing after-step hook (e.g. the prefill role's KV shipping) is
logged and the engine keeps stepping; it must never stop every later request."""
from __future__ import annotations

import asyncio

import pytest

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.engine import Engine, StepOutput

pytestmark = pytest.mark.timeout(120)


async def _tokens(async_engine: AsyncEngine, prompt: list[int], params: SamplingParams, rid: str) -> list[int]:
    return [t async for out in async_engine.generate(prompt, params, rid) for t in out.new_token_ids]


async def test_engine_keeps_stepping_after_the_hook_raises(tiny_model_path, caplog) -> None:  # noqa: ANN001
    calls: list[int] = []

    async def hook(outputs: list[StepOutput]) -> None:
        calls.append(len(outputs))
        if len(calls) == 1:
            raise RuntimeError("shipping broke")

    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [[5, 6, 7, 8], list(range(3, 40))]
    expected = [r.outputs[0].token_ids for r in LLM(tiny_model_path).generate(prompts, params)]
    async_engine = AsyncEngine(Engine(tiny_model_path), after_step=hook)
    await async_engine.start()
    try:
        got = [await asyncio.wait_for(_tokens(async_engine, prompt, params, f"r{i}"), 30)
               for i, prompt in enumerate(prompts)]
    finally:
        await async_engine.stop()
    assert got == expected
    assert len(calls) > 2
    assert "after-step hook failed" in caplog.text


async def test_stream_merged_joins_only_what_already_waits() -> None:
    """A consumer that fell behind gets the queued outputs as one (tokens in order, the
    last one's finish); one that keeps up gets each output alone."""
    engine = AsyncEngine.__new__(AsyncEngine)  # stream_merged reads only the queue
    queue: asyncio.Queue[StepOutput] = asyncio.Queue()
    for token in (11, 12, 13):
        queue.put_nowait(StepOutput("r", [token], [], False, None, None))
    stream = engine.stream_merged(queue)
    first = await anext(stream)
    assert (first.new_token_ids, first.finished) == ([11, 12, 13], False)
    queue.put_nowait(StepOutput("r", [14], [], False, None, None))
    assert (await anext(stream)).new_token_ids == [14]
    queue.put_nowait(StepOutput("r", [15], [], False, None, None))
    queue.put_nowait(StepOutput("r", [16], [], True, "length", None))
    queue.put_nowait(StepOutput("r", [99], [], False, None, None))  # never read: the stream ended
    last = await anext(stream)
    assert (last.new_token_ids, last.finished, last.finish_reason) == ([15, 16], True, "length")
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_redirect_hands_queued_then_published_outputs_to_the_sink_in_order() -> None:
    """What waited in the queue goes to the sink first; later outputs go to it from
    `publish`, without the queue; a stale queue redirects nothing."""
    engine = AsyncEngine.__new__(AsyncEngine)  # redirect and publish touch only the subscriptions
    engine._queues = {}
    queue = engine.subscribe("r")
    engine.publish([StepOutput("r", [1], [], False, None, None), StepOutput("other", [7], [], False, None, None)])
    engine.publish([StepOutput("r", [2], [], False, None, None)])
    got: list[int] = []
    assert engine.redirect("r", queue, lambda out: got.extend(out.new_token_ids))
    assert got == [1, 2] and queue.empty()
    engine.publish([StepOutput("r", [3], [], True, "length", None)])
    assert got == [1, 2, 3] and queue.empty()
    assert engine.subscribed("r") and not engine.subscribed("other")
    assert not engine.redirect("r", queue, got.append)  # the subscription is no longer this queue
    engine.unsubscribe("r")
    engine.publish([StepOutput("r", [4], [], False, None, None)])  # nobody listens: dropped
    assert got == [1, 2, 3] and not engine.subscribed("r")
