"""Process checks for tests that start processes of their own (tensor-parallel ranks)."""
from __future__ import annotations

import time
from pathlib import Path


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_gone(pid: int, timeout_s: float) -> float:
    """Seconds until `pid` is gone; AssertionError past `timeout_s`."""
    start = time.monotonic()
    while alive(pid):
        assert time.monotonic() - start < timeout_s, f"pid {pid} still alive after {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def child_pids(pid: int) -> list[int]:
    """Live children of `pid`."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children
