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
