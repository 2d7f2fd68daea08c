"""The soak benchmark in a tiny mode, so it cannot rot: a real cluster (router, prefill
and decode processes, real sockets), seconds instead of minutes. Eight seconds say
nothing about leaks; the run checks the machinery (load, sampling, report, exit status),
and the growth arithmetic and the 5% verdict are checked on their own below."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.rss import Growth, Sample, growth, tree_rss
from bench.soak import Outcome, print_memory

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("router", "prefill-0", "decode-0")
NUMBER = r"[+-]?\d+(?:\.\d+)?"


def test_soak_runs_and_reports_every_process(tiny_model_path: Path, tmp_path: Path) -> None:
    # Four seconds of capacity run are a rough figure (on a busy machine, a lull can double
    # it), so the load is half of it; and eight seconds of RSS say nothing about leaks (the
    # requests in flight alone can move the router's by 5%), so the limit only has to be met.
    command = [sys.executable, "-m", "bench.soak", "--duration", "8", "--warmup", "3", "--sample-interval", "1",
               "--capacity-duration", "4", "--capacity-concurrency", "16", "--load-fraction", "0.5",
               "--max-growth-pct", "50", "--log-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for name in PROCESSES:
        row = re.search(rf"^\| {name} \| (.*) \|$", out, re.MULTILINE)
        assert row, out
        cells = [c.strip() for c in row.group(1).split("|")]
        assert len(cells) == 6 and all(re.fullmatch(NUMBER, c) for c in cells), row.group(0)
        assert float(cells[0]) > 0 and int(cells[5]) >= 2  # RSS at the end of warm-up; samples in the window
        assert re.search(rf"^PASS {name}: RSS {NUMBER}% after warm-up \(< 50%\)", out, re.MULTILINE), out
    assert re.search(r"^errors: 0 \(0 failed, 0 unfinished of \d+ requests\)$", out, re.MULTILINE), out
    assert re.search(rf"^achieved: {NUMBER} req/s sent, {NUMBER} req/s completed", out, re.MULTILINE), out
    assert re.search(rf"^latency \(measured window, ms\): e2e p50 {NUMBER} p99 {NUMBER}", out, re.MULTILINE), out
    assert "RESULT: PASS" in out and "command: python -m bench.soak --duration 8" in out
    with open(tmp_path / "rss.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["process"] for r in rows} == set(PROCESSES)
    assert {"capacity", "warmup", "measure", "drain"} <= {r["phase"] for r in rows}


def test_soak_refuses_bad_arguments() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.soak", "--load-fraction", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--load-fraction" in done.stderr


def test_growth_is_end_against_end_of_warmup_with_a_fitted_slope() -> None:
    window = [Sample(60.0 * i, "measure", "router", 1, 1000 * 1024 + 10 * 1024 * i, 1) for i in range(5)]
    window.append(Sample(0.0, "measure", "other", 2, 1024, 1))
    g = growth("router", window)
    assert g is not None and g.samples == 5
    assert (g.warm_kib, g.end_kib, g.max_kib) == (1000 * 1024, 1040 * 1024, 1040 * 1024)
    assert abs(g.growth_pct - 4.0) < 1e-9 and abs(g.slope_mib_per_min - 10.0) < 1e-9
    assert growth("other", window) is None  # one sample is no window



def test_verdict_fails_a_process_at_the_limit(capsys: pytest.CaptureFixture[str]) -> None:
    growths: dict[str, Growth | None] = {
        "router": Growth("router", 100 * 1024, 104 * 1024 + 900, 105 * 1024, 0.1, 20),  # +4.88%
        "decode-0": Growth("decode-0", 100 * 1024, 105 * 1024, 105 * 1024, 0.5, 20),  # +5.00%
        "prefill-0": None}  # died before the window
    assert not print_memory(Outcome(1.0, None, [], growths, []), 5.0)
    out = capsys.readouterr().out
    assert "PASS router: RSS +4.88% after warm-up (< 5%)" in out
    assert "FAIL decode-0: RSS +5.00% after warm-up (>= 5%)" in out
    assert "FAIL prefill-0: fewer than two samples after warm-up" in out
    assert print_memory(Outcome(1.0, None, [], {"router": growths["router"]}, []), 5.0)

def test_tree_rss_counts_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alone = tree_rss(child.pid)
        with_child = tree_rss(os.getpid())
        assert alone is not None and alone.processes == 1 and alone.rss_kib > 0
        assert with_child is not None and with_child.processes >= 2
    finally:
        child.kill()
        child.wait()
    assert tree_rss(child.pid) is None
