"""The router benchmark in a tiny mode against our router only, so it cannot rot: real
router process, real stub workers registering over gRPC, real sockets."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_router_bench_runs_against_our_router(tiny_model_path: Path) -> None:
    command = [sys.executable, "-m", "bench.router_bench", "--only", "ours", "--modes", "regular,pd",
               "--rounds", "1", "--tokens", "8", "--pairs", "10", "--concurrency", "2", "--concurrency", "8",
               "--warmup", "0.2", "--measure", "0.5"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| regular") or line.startswith("| pd")]
    assert [row.split("|")[1:3] for row in rows] == [[" regular ", " ours "], [" pd ", " ours "]]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # added p50/p99, req/s at 2 and 8, CPU per request at 1, 2 and 8, stubs' CPU: all measured numbers
        numbers = [float(c) for c in cells[2:4] + cells[5:7] + cells[7:11]]
        assert all(n == n for n in numbers) and float(cells[5]) > 0 and float(cells[6]) > 0
        assert re.fullmatch(r"[\d.]+ / [\d.]+", cells[11])  # start: /health / first request
    assert "# python -m bench.router_bench" in done.stdout


def test_router_bench_refuses_bad_arguments() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.router_bench", "--modes", "sideways"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--modes" in done.stderr
