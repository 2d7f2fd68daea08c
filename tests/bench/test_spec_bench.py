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
