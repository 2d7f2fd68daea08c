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
