"""KV transfer throughput: each backend vs. a raw loopback socket copy.

Moves the KV cache of 2,048 tokens of Llama-3.1-8B (32 layers x K,V x 8 KV heads
x 128 head dim x 2 bytes = 128 KiB per token -> 256 MiB; 16-token pages -> 2 MiB
pages, 128 of them) from this process into a receiver process, as page runs
scattered over the receiver's region, and times ``write`` until it returns
(i.e. until the receiver has applied data and notification). In turns with it
(same run, same machine load) it times a plain blocking ``sendall``/``recv_into``
of the same bytes between two processes: the ceiling for a TCP-based backend.

    python -m bench.transfer_bench --backend tcp
    python -m bench.transfer_bench --backend mooncake --backend nixl --rounds 3
    python -m bench.transfer_bench --backend mooncake --option protocol=rdma \
        --option device_name=mlx5_0
    python -m bench.transfer_bench --backend cuda_ipc          # GPU 0 -> GPU 0
    CUDA_VISIBLE_DEVICES=0,1 python -m bench.transfer_bench --backend cuda_ipc \
        --device cuda:0 --peer-device cuda:1

``--option KEY=VALUE`` goes to every measured backend's config (values are JSON
when they parse, else strings). ``--rounds N`` repeats the whole measurement N
times (fresh processes, backends taken in turns within each round) and ends with
the median over rounds of each backend's ratio to the raw socket of its own
round; the machine's load average is printed with every round, since other work
on a small host moves both figures. Library environment knobs apply as usual, e.g.
``UCX_TLS=tcp UCX_NET_DEVICES=lo`` makes NIXL take the TCP path on one host
(it would use shared memory otherwise) and ``MC_TCP_BIND_ADDRESS=127.0.0.1``
keeps Mooncake's TCP transport on loopback; the header prints those in effect.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import random
import resource
import shlex
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from kv_transfer import (EndpointDescriptor, Notification, available_backends,
                         backend_availability, coalesce, compat_hash, create_backend)

ENV_KNOBS = ("UCX_TLS", "UCX_NET_DEVICES", "UCX_USE_MT_MUTEX", "MC_TCP_BIND_ADDRESS",
             "CUDA_VISIBLE_DEVICES")


@dataclass(frozen=True)
class KvGeometry:
    """Page-major KV cache: [num_pages, layers, 2, page_size, kv_heads, head_dim]."""

    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2  # bf16
    page_size: int = 16  # tokens per page
    tokens: int = 2048

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def page_bytes(self) -> int:
        return self.page_size * self.bytes_per_token

    @property
    def num_pages(self) -> int:
        return -(-self.tokens // self.page_size)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_pages, self.layers, 2, self.page_size, self.kv_heads,
                self.head_dim)

    def compat(self) -> str:
        return compat_hash(model="bench-llama-3.1-8b", dtype="bfloat16",
                           layers=self.layers, kv_heads=self.kv_heads,
                           head_dim=self.head_dim, page_size=self.page_size)


@dataclass(frozen=True)
class Result:
    label: str
    seconds: list[float]
    nbytes: int
    # CPU seconds each copy took in the sender's and the receiver's process (all
    # their threads): on a small, shared host the copy is CPU-bound and these
    # explain the ratios.
    sender_cpu: list[float] = field(default_factory=list)
    receiver_cpu: list[float] = field(default_factory=list)

    def gbps(self, seconds: float) -> float:
        return self.nbytes / seconds / 1e9

    def line(self) -> str:
        best, median = min(self.seconds), statistics.median(self.seconds)
        cpu = ""
        if self.sender_cpu:
            tx, rx = (statistics.median(x) * 1e3 for x in (self.sender_cpu, self.receiver_cpu))
            cpu = f"   cpu per copy {tx:3.0f} + {rx:3.0f} ms (sender + receiver)"
        return (f"{self.label:<12} median {self.gbps(median):6.2f} GB/s   "
                f"best {self.gbps(best):6.2f} GB/s   ({len(self.seconds)} runs){cpu}")


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def scattered_dst_pages(num_pages: int, block: int, seed: int = 0) -> list[int]:
    """Destination pages in shuffled blocks, so the write is several page runs."""
    blocks = [list(range(s, min(s + block, num_pages))) for s in range(0, num_pages, block)]
    random.Random(seed).shuffle(blocks)
    return [p for b in blocks for p in b]


# ------------------------------------------------------------------ backend run


@dataclass(frozen=True)
class BackendRun:
    """One backend to measure: its config and where each side keeps its KV."""

    name: str
    device: str = "cpu"  # the sender's region
    peer_device: str = "cpu"  # the receiver's region (another process)
    config: dict[str, Any] = field(default_factory=dict)

    def create(self, geo: KvGeometry) -> Any:
        return create_backend(self.name, compat_hash=geo.compat(), **self.config)

    @property
    def label(self) -> str:
        options = ",".join(f"{k}={v}" for k, v in self.config.items())
        label = f"{self.name}({options})" if options else self.name
        if (self.device, self.peer_device) != ("cpu", "cpu"):
            label += f"[{self.device}->{self.peer_device}]"
        return label


def _backend_receiver(run: BackendRun, geo: KvGeometry, conn: Connection) -> None:
    asyncio.run(_serve_backend(run, geo, conn))


async def _serve_backend(run: BackendRun, geo: KvGeometry, conn: Connection) -> None:
    kv = torch.zeros(geo.shape, dtype=torch.bfloat16, device=run.peer_device)
    async with run.create(geo) as backend:
        await backend.register_region("kv", kv)
        conn.send(backend.descriptor().to_dict())
        while (msg := await asyncio.to_thread(conn.recv)) is not None:
            room, pages = msg
            backend.reserve_room(room, 1, "kv", pages)
            conn.send("reserved")
            start = cpu_seconds()
            await backend.wait_notification(room, timeout=60)
            used = cpu_seconds() - start
            # In a thread: the loop must stay free to ACK the write (the sender's timer
            # stops at the ACK).
            digest = await asyncio.to_thread(
                lambda: hashlib.sha256(kv.cpu().view(torch.uint8).numpy()).hexdigest())
            backend.release_room(room)
            conn.send((digest, used))


class RawLink:
    """A plain blocking socket to a receiver process that ``recv_into``s a
    preallocated buffer: the baseline, timed in turns with the backend so that
    both see the same machine load."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        ctx = mp.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_raw_receiver, args=(len(data), child), daemon=True)
        self._proc.start()
        self._sock = socket.create_connection(("127.0.0.1", self._pipe.recv()))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def copy_once(self) -> tuple[float, float, float]:
        """(wall seconds, sender CPU seconds, receiver CPU seconds)."""
        start, cpu = time.perf_counter(), cpu_seconds()
        self._sock.sendall(self._data)
        self._sock.recv(1)  # the receiver has every byte
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        return seconds, cpu, self._pipe.recv()

    def close(self) -> None:
        self._sock.close()
        self._proc.join(timeout=30)


def _raw_receiver(nbytes: int, conn: Connection) -> None:
    buf = memoryview(bytearray(nbytes))
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn.send(server.getsockname()[1])
        sock, _ = server.accept()
        with sock:
            while True:
                got, start = 0, cpu_seconds()
                while got < nbytes:
                    n = sock.recv_into(buf[got:])
                    if n == 0:
                        return
                    got += n
                conn.send(cpu_seconds() - start)
                sock.sendall(b"k")


async def _drive_backend(run: BackendRun, geo: KvGeometry, iters: int, kv: torch.Tensor,
                         conn: Connection, raw: RawLink
                         ) -> tuple[Timings, Timings, list[float]]:
    """(backend, raw socket, torch device copy) timings, one copy of each per iteration
    in turns; the device copy only where the KV is on a GPU (else empty)."""
    dst_pages = scattered_dst_pages(geo.num_pages, block=8)
    runs = coalesce(range(geo.num_pages), dst_pages)
    expected = _expected_digest(kv, dst_pages)
    timed, raw_timed, d2d_seconds = Timings(), Timings(), []
    src = kv.to(run.device)
    # On GPUs the ceiling is a plain torch copy of the same bytes between the same
    # devices, in this process, timed in turns with the backend.
    d2d = torch.empty_like(src, device=run.peer_device) if src.is_cuda else None
    async with run.create(geo) as backend:
        await backend.register_region("kv", src)
        peer_desc = EndpointDescriptor.from_dict(await asyncio.to_thread(conn.recv))
        peer = await backend.connect(peer_desc, timeout=10)
        for i in range(iters + 1):  # iteration 0 warms both paths up, untimed
            raw_time = raw.copy_once()
            d2d_time = _torch_copy_once(src, d2d) if d2d is not None else 0.0
            conn.send((f"bench-{i}", dst_pages))
            await asyncio.to_thread(conn.recv)
            note = Notification(f"bench-{i}", 1, 0, b"", final=True)
            start, cpu = time.perf_counter(), cpu_seconds()
            await backend.write(peer, f"bench-{i}", 1, "kv", runs, note, timeout=60)
            seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
            digest, receiver_cpu = await asyncio.to_thread(conn.recv)
            if digest != expected:
                raise SystemExit(f"{run.label}: receiver memory differs from the source")
            if i:
                timed.add(seconds, cpu, receiver_cpu)
                raw_timed.add(*raw_time)
                if d2d is not None:
                    d2d_seconds.append(d2d_time)
        conn.send(None)
    return timed, raw_timed, d2d_seconds


def _torch_copy_once(src: torch.Tensor, dst: torch.Tensor) -> float:
    torch.cuda.synchronize(src.device)
    torch.cuda.synchronize(dst.device)
    start = time.perf_counter()
    dst.copy_(src)
    torch.cuda.synchronize(dst.device)
    torch.cuda.synchronize(src.device)
    return time.perf_counter() - start


@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)
    sender_cpu: list[float] = field(default_factory=list)
    receiver_cpu: list[float] = field(default_factory=list)

    def add(self, seconds: float, sender_cpu: float, receiver_cpu: float) -> None:
        self.seconds.append(seconds)
        self.sender_cpu.append(sender_cpu)
        self.receiver_cpu.append(receiver_cpu)

    def result(self, label: str, nbytes: int) -> Result:
        return Result(label, self.seconds, nbytes, self.sender_cpu, self.receiver_cpu)


def _expected_digest(kv: torch.Tensor, dst_pages: list[int]) -> str:
    dst = torch.empty_like(kv)
    dst[torch.tensor(dst_pages)] = kv
    return hashlib.sha256(dst.view(torch.uint8).numpy()).hexdigest()


def bench_backend(run: BackendRun, geo: KvGeometry, iters: int,
                  kv: torch.Tensor) -> tuple[Result, Result, Result | None]:
    """(backend, raw socket, torch device copy or None on CPU), measured in alternation."""
    data = memoryview(kv.reshape(-1).view(torch.uint8).numpy())
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_backend_receiver, args=(run, geo, child), daemon=True)
    proc.start()
    raw = RawLink(data)
    try:
        timed, raw_timed, d2d_seconds = asyncio.run(_drive_backend(run, geo, iters, kv, parent, raw))
    finally:
        raw.close()
        proc.join(timeout=30)
        proc.kill()
    d2d = Result("torch-copy", d2d_seconds, len(data)) if d2d_seconds else None
    return timed.result(run.label, len(data)), raw_timed.result("raw-socket", len(data)), d2d


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _runs(args: argparse.Namespace) -> list[BackendRun]:
    """Backends asked for (default: every one that can run here)."""
    runnable = [n for n, reason in backend_availability().items() if reason is None]
    runs = []
    for name in args.backend or runnable:
        gpu = name == "cuda_ipc"
        device = args.device or ("cuda" if gpu else "cpu")
        runs.append(BackendRun(name, device, args.peer_device or device, dict(args.option)))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=available_backends(),
                        help="backend to measure (repeatable; default: all)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the measurement; report medians over rounds")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--option", action="append", type=_option, default=[],
                        metavar="KEY=VALUE", help="backend config (repeatable)")
    parser.add_argument("--device", help="sender's KV device (default: cuda for "
                        "cuda_ipc, else cpu)")
    parser.add_argument("--peer-device", help="receiver's KV device (default: --device)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.iters < 1:
        parser.error("--rounds and --iters must be at least 1")
    geo = KvGeometry(tokens=args.tokens, page_size=args.page_size)
    kv = torch.randn(geo.shape, dtype=torch.bfloat16)
    print("command:", shlex.join([sys.executable, "-m", "bench.transfer_bench",
                                  *sys.argv[1:]]))
    print(f"KV: {geo.tokens} tokens x {geo.bytes_per_token >> 10} KiB/token = "
          f"{kv.numel() * 2 / 2**20:.0f} MiB; {geo.num_pages} pages of "
          f"{geo.page_bytes / 2**20:g} MiB ({geo.page_size} tokens), "
          f"{len(coalesce(range(geo.num_pages), scattered_dst_pages(geo.num_pages, 8)))}"
          " page runs")
    knobs = [f"{k}={os.environ[k]}" for k in ENV_KNOBS if k in os.environ]
    print("environment:", " ".join(knobs) or "(no transport knobs set)")
    rounds = measure(_runs(args), geo, kv, args.iters, args.rounds)
    if args.rounds > 1:
        print(f"median over {args.rounds} rounds (load average now {_load()}):")
        for label, pairs in rounds.items():
            print(_summary(label, pairs))


Measured = tuple[Result, Result, "Result | None"]


def measure(runs: list[BackendRun], geo: KvGeometry, kv: torch.Tensor, iters: int,
            rounds: int) -> dict[str, list[Measured]]:
    """Each round measures every backend in turn: label -> (backend, raw socket, torch
    device copy or None) per round."""
    results: dict[str, list[Measured]] = {run.label: [] for run in runs}
    for number in range(rounds):
        print(f"round {number + 1}/{rounds}: load average {_load()}")
        for run in runs:
            result, raw, d2d = bench_backend(run, geo, iters, kv)
            results[run.label].append((result, raw, d2d))
            print(raw.line())
            if d2d is not None:
                print(f"{d2d.line()}   [{run.device}->{run.peer_device}, one process]")
            baseline = d2d or raw
            print(f"{result.line()}   {_ratio(result, baseline):.0%} of {baseline.label} (median)")
    return results


def _ratio(result: Result, baseline: Result) -> float:
    return statistics.median(baseline.seconds) / statistics.median(result.seconds)


def _summary(label: str, measured: list[Measured]) -> str:
    def gbps(r: Result) -> float:
        return r.gbps(statistics.median(r.seconds))
    baselines = [d2d or raw for _, raw, d2d in measured]
    ratios = [_ratio(result, base) for (result, _, _), base in zip(measured, baselines)]
    return (f"{label:<12} {statistics.median(gbps(r) for r, _, _ in measured):6.2f} GB/s vs "
            f"{baselines[0].label} {statistics.median(gbps(b) for b in baselines):6.2f} GB/s: "
            f"{statistics.median(ratios):.0%} (rounds: "
            f"{', '.join(f'{x:.0%}' for x in ratios)})")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
