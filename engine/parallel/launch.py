"""Rank 0's side of a tensor-parallel engine: it starts ranks 1..N-1 as child processes
(`python -m engine.parallel.follower`), meets them through a TCP store it hosts, maps
their KV pages (CPU: each follower's cache is a memfd that rank 0 creates and passes
down, so rank 0's transfer backend can read and write every rank's pages), watches
them and stops them.

Lifetimes: a follower exits on STOP (`close`), and on its own when rank 0 is gone (its
stdin, a pipe from rank 0, reaches EOF, however rank 0 ended). A follower that exits
while rank 0 runs fails the group (`TPGroup.fail`): the step in flight and every later
one raise TensorParallelError, and the owner (the worker) is told so it can stop.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import EngineConfig, ModelConfig
from engine.errors import ConfigError
from engine.parallel.comm import TensorParallelError, TPGroup
from engine.parallel.layout import TPLayout
from engine.parallel.model import ParallelCausalLM, load_shard
from engine.parallel.step import send_stop

START_TIMEOUT_S = 600.0  # followers loading their shard of a large checkpoint
STOP_TIMEOUT_S = 10.0
POLL_S = 0.02


def rank_devices(device: str, size: int) -> list[torch.device]:
    """Rank r's device: the CPU, or CUDA device (index of `device`) + r."""
    base = torch.device(device)
    if base.type == "cpu":
        return [base] * size
    if base.type != "cuda":
        raise ConfigError(f"tensor parallelism runs on cpu or cuda devices, not {device!r}")
    first, count = base.index or 0, torch.cuda.device_count()
    if first + size > count:
        raise ConfigError(f"tensor_parallel_size {size} on {device} needs CUDA devices {first}..{first + size - 1}; "
                          f"{count} visible")
    return [torch.device("cuda", first + rank) for rank in range(size)]


def cpu_threads(size: int) -> int:
    """Torch threads of each of `size` CPU ranks on this host."""
    return max(1, (os.cpu_count() or 1) // size)


def kv_shape(config: ModelConfig, layout: TPLayout, engine: EngineConfig) -> tuple[int, ...]:
    """One rank's KV cache (engine.kv_cache's page-major layout, its KV heads only)."""
    return (engine.num_pages, config.num_layers, 2, engine.page_size, layout.kv_heads_per_rank, config.head_dim)


def map_shared(fd: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The memfd `fd` as a tensor of `shape` (writes are seen by every process mapping it)."""
    numel = 1
    for size in shape:
        numel *= size
    return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=numel, dtype=dtype).view(shape)


def config_to_json(config: EngineConfig) -> dict[str, object]:
    return asdict(config)


def config_from_json(data: dict[str, object]) -> EngineConfig:
    return EngineConfig(**{**data, "cuda_graph_batch_sizes": tuple(data["cuda_graph_batch_sizes"])})  # type: ignore[arg-type]


class TensorParallel:
    """Rank 0's handle on the other ranks. Built by Engine for tensor_parallel_size > 1."""

    def __init__(self, model_path: Path, model_config: ModelConfig, config: EngineConfig) -> None:
        self.layout = TPLayout.of(model_config, config.tensor_parallel_size)
        self.devices = rank_devices(config.device, self.layout.size)
        self.model_config, self.config = model_config, config
        self.local_config = self.layout.local_model_config(model_config)
        # Followers' KV caches, mapped here (CPU only), in rank order from rank 1.
        self.follower_kv: list[torch.Tensor] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.group: TPGroup | None = None
        self._fds: list[int] = []
        self._closing = False
        # CPU ranks share the host's cores: each runs torch with cores/N threads (rank 0 too,
        # while this engine is open; more threads than cores make every rank's OpenMP
        # spin against the others).
        self._threads = torch.get_num_threads()
        if self.devices[0].type == "cpu":
            torch.set_num_threads(cpu_threads(self.layout.size))
        else:  # NCCL binds each rank's communicator to its current device
            torch.cuda.set_device(self.devices[0])
        timeout = datetime.timedelta(seconds=START_TIMEOUT_S)
        self.store = dist.TCPStore("127.0.0.1", 0, self.layout.size, True, timeout=timeout, wait_for_workers=False)
        try:
            for rank in range(1, self.layout.size):
                self._spawn(rank, model_path)
            self._wait_for("joined", config.tensor_parallel_timeout_s)
            self.group = TPGroup(self.store, 0, self.layout.size, self.devices[0], config.tensor_parallel_timeout_s)
            for rank, proc in enumerate(self.processes, 1):
                threading.Thread(target=self._watch, args=(rank, proc), name=f"tp-rank-{rank}", daemon=True).start()
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.processes]

    def _spawn(self, rank: int, model_path: Path) -> None:
        fd = None
        if self.devices[rank].type == "cpu":
            shape = kv_shape(self.model_config, self.layout, self.config)
            fd = os.memfd_create(f"epd-kv-rank{rank}", os.MFD_CLOEXEC)
            self._fds.append(fd)
            itemsize = torch.empty(0, dtype=self.model_config.torch_dtype).element_size()
            os.ftruncate(fd, itemsize * int(torch.Size(shape).numel()))
            self.follower_kv.append(map_shared(fd, shape, self.model_config.torch_dtype))
        spec = {"rank": rank, "size": self.layout.size, "store_port": self.store.port, "model": str(model_path),
                "config": config_to_json(self.config), "kv_fd": fd}
        proc = subprocess.Popen([sys.executable, "-m", "engine.parallel.follower"], stdin=subprocess.PIPE,
                                pass_fds=() if fd is None else (fd,), env=_child_env())
        self.processes.append(proc)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode() + b"\n")
        proc.stdin.flush()  # the pipe stays open: its EOF tells the follower rank 0 is gone

    def _wait_for(self, stage: str, timeout_s: float) -> None:
        """Until every follower has set `stage/<rank>` in the store; fails at once when one exits."""
        keys = [f"{stage}/{rank}" for rank in range(1, self.layout.size)]
        deadline = time.monotonic() + timeout_s
        while not self.store.check(keys):
            for rank, proc in enumerate(self.processes, 1):
                if proc.poll() is not None:
                    raise TensorParallelError(f"tensor-parallel rank {rank} exited with code {proc.returncode} "
                                              f"while starting (its log is above)")
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel ranks were not {stage} within {timeout_s:.0f} s")
            time.sleep(POLL_S)

    def load_model(self, path: Path | None, load_format: str, seed: int) -> ParallelCausalLM:
        """Rank 0's shard (the followers load theirs meanwhile)."""
        assert self.group is not None
        return load_shard(path, self.model_config, self.layout, self.group, self.devices[0], load_format, seed)

    def wait_ready(self) -> None:
        self._wait_for("ready", START_TIMEOUT_S)

    def _watch(self, rank: int, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if not self._closing and self.group is not None:
            self.group.fail(TensorParallelError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with "
                                                f"code {code}"))

    def close(self) -> None:
        """Stop the followers (STOP, then a kill past STOP_TIMEOUT_S or after a failure)
        and release what rank 0 holds of them. Idempotent."""
        if self._closing:
            return
        self._closing = True
        group = self.group
        healthy = group is not None and group.failure is None
        if healthy:
            try:
                send_stop(group)  # type: ignore[arg-type]
            except TensorParallelError:
                healthy = False
        deadline = time.monotonic() + (STOP_TIMEOUT_S if healthy else 0.5)
        for proc in self.processes:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.05))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.group = None
        torch.set_num_threads(self._threads)


def _child_env() -> dict[str, str]:
    """The followers import this checkout's packages, wherever they are started from."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([root, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else root
    return env
