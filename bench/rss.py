"""Resident memory of process trees, read from /proc (no psutil): samples over time, a
CSV of them, and what a soak run judges by (growth after warm-up, a fitted slope).

A tree's RSS is the sum of VmRSS over the process and all its descendants. Pages shared
between them (a fork's copy-on-write pages) count once per process, so the sum can
overstate the tree's footprint; it is the same overstatement in every sample, which is
what a growth figure needs.
"""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

_PROC = Path("/proc")


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process now (those that vanish while read are skipped)."""
    parents: dict[int, int] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
        parents[int(entry.name)] = int(fields[1])  # field 4: ppid
    return parents


def tree_pids(root: int, parents: dict[int, int]) -> list[int]:
    """`root` and every descendant of it (root first)."""
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def vm_rss_kib(pid: int) -> int | None:
    """VmRSS of one process in KiB; None once it has exited (or for a zombie, which has none)."""
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class TreeRss:
    rss_kib: int  # summed over the tree
    processes: int  # how many of the tree had an RSS


def tree_rss(root: int, parents: dict[int, int] | None = None) -> TreeRss | None:
    """The tree's RSS; None when its root has exited."""
    if vm_rss_kib(root) is None:
        return None
    values = [v for v in map(vm_rss_kib, tree_pids(root, parents or _parent_pids())) if v is not None]
    return TreeRss(sum(values), len(values))


@dataclass(frozen=True)
class Sample:
    elapsed_s: float  # since the sampler started
    phase: str
    process: str
    pid: int
    rss_kib: int
    tree_processes: int


class RssLog:
    """Samples of named process trees, appended to a CSV as they are taken."""

    FIELDS = ("elapsed_s", "phase", "process", "pid", "rss_kib", "tree_processes")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples: list[Sample] = []
        self._file = open(path, "w", newline="")  # noqa: SIM115 - closed by close()
        self._writer = csv.writer(self._file)
        self._writer.writerow(self.FIELDS)

    def take(self, elapsed_s: float, phase: str, roots: dict[str, int]) -> list[str]:
        """One sample of each tree; the names of those whose root has exited."""
        parents, gone = _parent_pids(), []
        for name, pid in roots.items():
            rss = tree_rss(pid, parents)
            if rss is None:
                gone.append(name)
                continue
            sample = Sample(round(elapsed_s, 3), phase, name, pid, rss.rss_kib, rss.processes)
            self.samples.append(sample)
            self._writer.writerow([getattr(sample, f) for f in self.FIELDS])
        self._file.flush()
        return gone

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class Growth:
    """One process tree's memory over the measured window (after warm-up)."""

    process: str
    warm_kib: int  # the window's first sample: the end of warm-up
    end_kib: int  # its last sample: the end of the load
    max_kib: int  # the largest sample in the window
    slope_mib_per_min: float  # least-squares fit over every sample in the window
    samples: int

    @property
    def growth_pct(self) -> float:
        return 100.0 * (self.end_kib - self.warm_kib) / self.warm_kib


def growth(process: str, window: Iterable[Sample]) -> Growth | None:
    """The growth of `process` over the samples of the window; None with fewer than two."""
    points = sorted((s for s in window if s.process == process), key=lambda s: s.elapsed_s)
    if len(points) < 2:
        return None
    minutes = [s.elapsed_s / 60.0 for s in points]
    mib = [s.rss_kib / 1024.0 for s in points]
    slope = statistics.linear_regression(minutes, mib).slope
    return Growth(process, points[0].rss_kib, points[-1].rss_kib, max(s.rss_kib for s in points), slope, len(points))
