"""deploy/worker_main.py: EPD_GIL_SWITCH_MS sets the worker process's GIL switch interval;
a bad value stops the worker with a clear message before anything starts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.worker_main import gil_switch_interval

REPO = Path(__file__).resolve().parents[2]


def test_switch_interval_from_the_environment() -> None:
    assert gil_switch_interval({}) is None
    assert gil_switch_interval({"EPD_GIL_SWITCH_MS": "0.5"}) == pytest.approx(0.0005)
    assert gil_switch_interval({"EPD_GIL_SWITCH_MS": "5"}) == pytest.approx(0.005)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2000", "nan"])
def test_bad_switch_interval_is_an_error(value: str) -> None:
    with pytest.raises(ValueError, match="EPD_GIL_SWITCH_MS must be a number of milliseconds"):
        gil_switch_interval({"EPD_GIL_SWITCH_MS": value})


def test_worker_with_a_bad_switch_interval_exits_with_the_message() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EPD_GIL_SWITCH_MS": "fast"}
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "worker", "decode", "--port", "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "epd worker: error: EPD_GIL_SWITCH_MS must be a number of milliseconds in (0, 1000], got 'fast'" \
        in done.stderr
