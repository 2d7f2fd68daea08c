"""The worker-loop benchmark in a tiny mode, so it cannot rot: a real decode worker process
with the null model, both client paths, the engine alone, the worker's loop figures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_worker_loop_bench_runs_both_paths() -> None:
    command = [sys.executable, "-m", "bench.worker_loop", "--requests", "24", "--concurrency", "8",
               "--prompt-len", "16", "--output-len", "6", "--rounds", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in done.stdout.splitlines() if line.startswith(("| stream", "| generate"))}
    assert set(rows) == {"stream", "generate"}
    for cells in rows.values():
        served, alone, ratio, step_ms, gap_ms = map(float, cells[1:6])
        assert served > 0 and alone > 0 and step_ms > 0 and gap_ms >= 0
        assert abs(ratio - served / alone) < 0.002


def test_worker_loop_bench_refuses_an_unknown_path() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.worker_loop", "--paths", "carrier-pigeon"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--paths" in done.stderr
