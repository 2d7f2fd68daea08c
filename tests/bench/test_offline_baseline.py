"""bench.offline_baseline on the tiny model: its figures agree with the requests it ran
(output tokens, prompt tokens prefilled across the recorded steps, ordered percentiles)."""
from __future__ import annotations

import json

import pytest

from bench import offline_baseline


@pytest.mark.parametrize("overlap", [False, True])
def test_offline_baseline_figures_match_the_workload(capsys, overlap: bool) -> None:  # noqa: ANN001
    requests, input_len, output_len = 8, 64, 16
    assert offline_baseline.main(["--num-requests", str(requests), "--input-len", str(input_len),
                                  "--output-len", str(output_len), "--repeats", "2", "--",
                                  "--max-num-batched-tokens", "128"] + (["--overlap-schedule"] if overlap else [])) == 0
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["output_tokens"] == requests * output_len
    # Random prompts over a 500-token vocabulary share no page: every prompt token is
    # computed once, in chunks of at most the 128-token budget.
    assert figures["prefill_tokens_total"] == requests * input_len
    assert figures["steps_with_prefill"] >= requests * input_len // 128
    assert 0 < figures["step_p50_s"] <= figures["step_p99_s"]
    assert 0 < figures["engine_itl_p50_s"] <= figures["engine_itl_p99_s"]
    slowest = figures["slowest_steps"]
    assert slowest and slowest[0]["seconds"] == max(s["seconds"] for s in slowest)
    assert all(s["prefill_tokens"] <= 128 and s["decode_rows"] <= requests for s in slowest)
    assert "slowest steps" in out
    listed = figures["step_list"]  # every step, in order (with overlap: shapes paired with the next call's time)
    assert len(listed) == figures["steps"] and sum(s[2] for s in listed) == requests * input_len
    assert all(0 <= s[4] <= s[0] + 0.01 for s in listed)  # host time within the call
    assert max(s[0] for s in listed) == pytest.approx(slowest[0]["seconds"] * 1e3, abs=0.01)


def test_kernel_builds_chains_and_restores_the_hook() -> None:
    triton = pytest.importorskip("triton")
    knobs = triton.knobs
    seen: list[str] = []
    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda **kwargs: seen.append(kwargs["repr"])
    try:
        mine = knobs.runtime.jit_post_compile_hook
        with offline_baseline.kernel_builds() as built:
            knobs.runtime.jit_post_compile_hook(repr="k[...]", fn=None)  # as Triton calls it after a build
        assert built == ["k[...]"] and seen == ["k[...]"]  # recorded, and the hook before still called
        assert knobs.runtime.jit_post_compile_hook is mine
    finally:
        knobs.runtime.jit_post_compile_hook = previous


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (the interpreter builds nothing)")
def test_kernel_builds_records_triton_compiles() -> None:
    """A kernel variant first built inside the block is listed; nothing built outside it is."""
    import torch
    import triton
    tl = triton.language

    @triton.jit
    def _scale(x_ptr, n, FACTOR: tl.constexpr):
        offsets = tl.arange(0, 16)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * FACTOR, mask=mask)

    x = torch.ones(16, device="cuda")
    with offline_baseline.kernel_builds() as built:
        _scale[(1,)](x, 16, FACTOR=2)
        _scale[(1,)](x, 16, FACTOR=2)  # the same variant: built once
    _scale[(1,)](x, 16, FACTOR=3)  # outside the block: not recorded
    assert len(built) == 1 and "_scale" in built[0]
    assert torch.equal(x, torch.full((16,), 12.0, device="cuda"))
