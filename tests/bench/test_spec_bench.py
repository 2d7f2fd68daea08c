"""bench/spec_bench.py runs on the CPU with the tiny model and reports every setting."""
from __future__ import annotations

import json

from bench import spec_bench


def test_spec_bench_smoke(tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "results.json"
    assert spec_bench.main(["--model", "tiny", "--batches", "1,2", "--output-len", "12", "--prompt-len", "32",
                            "--ngram-k", "3", "--draft-k", "2", "--work-dir", str(tmp_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "command:" in text and "accept len" in text
    results = json.loads(out.read_text())
    assert {(r["setting"], r["batch"]) for r in results} == {(s, b) for s in ("none", "ngram-k3", "draft-k2")
                                                            for b in (1, 2)}
    for r in results:
        assert r["itl_ms"] > 0 and r["tokens"] == 12 * r["batch"] and r["acceptance_length"] >= 1.0
        # Greedy outputs are the same with or without speculation, so is how much of T
        # they repeat. (The tiny model's continuation of P + T + P does not repeat T:
        # measured echo 0 and acceptance 1.00 here, so no acceptance > 1 is asserted.)
        assert r["echo"] == next(n["echo"] for n in results if n["setting"] == "none" and n["batch"] == r["batch"])


def test_echo_workload_is_seed_continuation_seed(tiny_model_path) -> None:  # noqa: ANN001
    from engine import Engine
    engine = Engine(tiny_model_path)
    echo = spec_bench.echo_workload(engine, 2, 10, 6, seed=1)
    for prompt, continuation in zip(echo.prompts, echo.continuations):
        seed = prompt[:5]
        assert len(continuation) == 6 and prompt == seed + continuation + seed
    assert spec_bench.echoed([[1, 2, 3], [4]], [[1, 2, 9], [5]]) == 1.0


def test_repeat_workload_on_tiny_gets_drafts_accepted(tmp_path, capsys) -> None:  # noqa: ANN001
    """A pattern repeated to the prompt length: the tiny model's greedy output settles into
    a run or cycle that lookup drafts, so n-gram acceptance is measured above 1."""
    out = tmp_path / "results.json"
    assert spec_bench.main(["--model", "tiny", "--batches", "1", "--output-len", "48", "--prompt-len", "64",
                            "--workload", "repeat", "--period", "4", "--ngram-k", "4", "--draft-k", "",
                            "--work-dir", str(tmp_path), "--out", str(out)]) == 0
    assert "4-token pattern repeated to 64 tokens" in capsys.readouterr().out
    results = {r["setting"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"none", "ngram-k4"} and results["ngram-k4"]["acceptance_length"] > 1.5


def test_repeat_workload_repeats_a_pattern() -> None:
    work = spec_bench.repeat_workload(3, 10, 4, 1000, seed=2)
    for prompt in work.prompts:
        assert len(prompt) == 10 and prompt[4:8] == prompt[:4] and prompt[8:] == prompt[:2]
    assert len({tuple(p[:4]) for p in work.prompts}) == 3


def test_continue_workload_is_the_targets_own_text(tiny_model_path) -> None:  # noqa: ANN001
    """Prompt = seed + the start of the target's greedy text; expected output = the rest of
    it, which the no-speculation target then reproduces token for token."""
    from engine import Engine
    engine = Engine(tiny_model_path)
    work = spec_bench.continue_workload(engine, 2, 24, 8, seed=3, seed_len=4)
    for prompt, expected in zip(work.prompts, work.continuations):
        assert len(prompt) == 24 and len(expected) == 8
    outputs, _ = spec_bench.run_batch(engine, work.prompts, 8)
    assert spec_bench.echoed(outputs, work.continuations) == 8.0


def test_lookup_ceiling_counts_what_lookup_would_get_accepted() -> None:
    # The output continues the prompt's cycle 1 2 3: after "3" lookup drafts "1 2" (K=2),
    # both accepted, and each step emits one more: 3 tokens per step.
    prompt, output = [1, 2, 3, 1, 2, 3], [1, 2, 3, 1, 2, 3]
    assert spec_bench.lookup_ceiling([prompt], [output], max_n=2, k=2) == 3.0
    # Nothing recurs: one token per step.
    assert spec_bench.lookup_ceiling([[5, 6, 7]], [[8, 9, 10]], max_n=2, k=3) == 1.0


def test_continue_workload_run_reports_the_ceiling(tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "results.json"
    assert spec_bench.main(["--model", "tiny", "--batches", "1", "--output-len", "16", "--prompt-len", "48",
                            "--workload", "continue", "--ngram-k", "3", "--draft-k", "",
                            "--work-dir", str(tmp_path), "--out", str(out)]) == 0
    assert "48 tokens of the target's own greedy text" in capsys.readouterr().out
    results = {r["setting"]: r for r in json.loads(out.read_text())}
    none, ngram = results["none"], results["ngram-k3"]
    assert none["ceiling"] is None and ngram["ceiling"] >= 1.0
    assert none["echo"] == 16.0 == ngram["echo"]  # both reproduce the expected output
    # Greedy speculation emits what the reference does, so its acceptance is lookup's on it.
    assert abs(ngram["acceptance_length"] - ngram["ceiling"]) < 1e-9
