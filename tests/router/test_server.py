"""`python -m router` as a process: serves HTTP and gRPC, and exits cleanly on SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def test_serve_until_sigterm(tiny_model_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "router", "--port", "0", "--grpc-port", "0", "--model", str(tiny_model_path),
         "--decode", "127.0.0.1:1", "--served-model-name", "tiny"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "the router exited during startup"
            if match := re.search(r"HTTP on [\d.]+:(\d+), gRPC on [\d.]+:(\d+)", line):
                port = int(match.group(1))
        assert port is not None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"
            assert http.get("/health").status_code == 503  # its decode worker never answers
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
