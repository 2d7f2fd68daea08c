"""The collectives of one tensor-parallel worker, on process groups it owns.

Groups are built straight from a store (no `init_process_group`, so no process-wide
default group: an engine's groups live and die with it):

- `control` (gloo): the step header rank 0 broadcasts before each step or to stop.
  Followers wait on it while the worker idles, so their timeout is effectively
  unbounded; rank 0's (the sender's) is the step timeout. A rank 0 that is gone ends
  the wait at once (the connection closes), as does the follower's stdin watchdog.
- `host` (gloo): the step's host-side inputs (lengths, page ids) and, on CPU, everything.
- `device` (nccl on CUDA, the `host` group on CPU): the step's device inputs, the
  all-reduces of the row-parallel layers and the logits gather.

Every collective but the followers' idle wait is bounded by the step timeout; a failed
one raises TensorParallelError and marks the group broken, so every later call fails at
once instead of hanging on a half-finished collective.
"""
from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.errors import EngineError

IDLE_TIMEOUT = datetime.timedelta(days=3650)  # a follower waiting for the next step
EXPLAIN_WAIT_S = 1.0


class TensorParallelError(EngineError):
    """A rank of a tensor-parallel worker died, hung or failed a collective."""


class TPGroup:
    """The process groups of one rank of a tensor-parallel engine (see the module docstring)."""

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device,
                 timeout_s: float) -> None:
        self.rank, self.size, self.device = rank, size, device
        timeout = datetime.timedelta(seconds=timeout_s)
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size,
                                             timeout if rank == 0 else IDLE_TIMEOUT)
        self.host = dist.ProcessGroupGloo(dist.PrefixStore("host", store), rank, size, timeout)
        self.device_group = self.host if device.type == "cpu" else _nccl(store, rank, size, timeout)
        self.failure: TensorParallelError | None = None
        # Told once of the first failure, on whichever thread saw it (the engine thread or
        # rank 0's process monitor): the worker stops itself loudly.
        self.on_failure: Callable[[TensorParallelError], None] | None = None
        self._lock = threading.Lock()

    def fail(self, error: TensorParallelError) -> TensorParallelError:
        """Record the first failure (later ones are dropped) and return it."""
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = error
        if first and self.on_failure is not None:
            self.on_failure(error)
        assert self.failure is not None
        return self.failure

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _run(self, what: str, start: Callable[[], dist.Work]) -> None:
        self.check()
        try:
            start().wait()
        except RuntimeError as exc:  # gloo/nccl: a peer closed, timed out or errored
            # A closed peer has usually died: give rank 0's process monitor a moment to
            # report which rank and how, the clearer first failure.
            deadline = time.monotonic() + EXPLAIN_WAIT_S
            while self.failure is None and self.rank == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            raise self.fail(TensorParallelError(f"tensor-parallel {what} failed on rank {self.rank}: {exc}")) from exc

    def broadcast_control(self, tensor: torch.Tensor) -> None:
        self._run("step header broadcast", lambda: self.control.broadcast([tensor], _root()))

    def broadcast_host(self, tensor: torch.Tensor) -> None:
        self._run("step input broadcast", lambda: self.host.broadcast([tensor], _root()))

    def broadcast_device(self, tensor: torch.Tensor) -> None:
        self._run("step input broadcast", lambda: self.device_group.broadcast([tensor], _root()))

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place; every rank ends with the same bytes."""
        self._run("all-reduce", lambda: self.device_group.allreduce([tensor]))

    def gather_to_first(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (equal shapes), on rank 0 in rank order; None elsewhere."""
        options = dist.GatherOptions()
        options.rootRank = 0
        parts = [torch.empty_like(tensor) for _ in range(self.size)] if self.rank == 0 else None
        self._run("logits gather", lambda: self.device_group.gather([parts] if parts is not None else [],
                                                                    [tensor], options))
        return parts


def _root() -> dist.BroadcastOptions:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    return options


def _nccl(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> dist.ProcessGroup:
    from torch.distributed import ProcessGroupNCCL  # only in CUDA builds of torch
    options = ProcessGroupNCCL.Options()
    options._timeout = timeout
    return ProcessGroupNCCL(dist.PrefixStore("device", store), rank, size, options)
