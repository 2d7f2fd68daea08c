"""Multi-turn chat: sessions + pinning against plain prefix caching against no caching.

`--users` users each hold a `--turns`-turn conversation; every conversation starts with
the same system prompt (`--system-len` tokens) and each turn sends the whole history so
far (system prompt, every earlier message and reply) plus a new message of `--user-len`
tokens, asking for `--output-len` tokens (greedy, exact lengths). Users run at once, each
turn after its previous one's reply. For each mode a fresh cluster (`--prefill` prefill
and `--decode` decode workers, the built-in tiny model on CPU unless told otherwise)
serves the same conversations:

  sessions  prefix cache; each user's turns carry a session id (router/sessions.py) and
            the system prompt is pinned on every worker first (POST /admin/pins)
  prefix    prefix cache and prefix-aware routing, no sessions, no pins
  none      --no-prefix-cache on every worker

Printed per mode: the prompt tokens sent, the prefill tokens the workers computed (the sum
of their prefill_tokens_total), prefix-hit tokens and session restores (the workers'
counters), TTFT and end-to-end latency seen by the client, and whether every reply equals
the other modes' (greedy outputs must not depend on caching). Before the measured run a
few unrelated requests warm every worker up (first forward passes); their counts are
left out.

    python -m bench.multiturn_bench --users 4 --turns 10
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc
import httpx

from deploy.local import ClusterSpec, LocalCluster
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from worker.config import free_port

MODES = ("sessions", "prefix", "none")
TOKEN_RANGE = (3, 500)  # random ids clear of the tiny model's special tokens


@dataclass(frozen=True)
class Workload:
    users: int = 4
    turns: int = 10
    system_len: int = 256
    user_len: int = 32
    output_len: int = 16
    seed: int = 0

    def system(self) -> list[int]:
        rng = random.Random(self.seed)
        return [rng.randrange(*TOKEN_RANGE) for _ in range(self.system_len)]

    def message(self, user: int, turn: int) -> list[int]:
        rng = random.Random(f"{self.seed}/{user}/{turn}")
        return [rng.randrange(*TOKEN_RANGE) for _ in range(self.user_len)]


@dataclass
class Turn:
    user: int
    turn: int
    prompt_len: int
    ttft: float
    e2e: float
    tokens: list[int]


@dataclass
class ModeResult:
    mode: str
    turns: list[Turn] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    start_s: float = 0.0

    def outputs(self) -> dict[tuple[int, int], list[int]]:
        return {(t.user, t.turn): t.tokens for t in self.turns}


async def _turn(stub: pb_grpc.RouterStub, prompt: list[int], output_len: int, session: str) -> tuple[list[int], float, float]:
    sampling = pb.SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling, session_id=session)
    start, first, tokens = time.perf_counter(), None, []
    async for message in stub.Generate(request, timeout=300):
        if message.HasField("chunk") and message.chunk.token_ids:
            first = first or time.perf_counter()
            tokens += message.chunk.token_ids
    end = time.perf_counter()
    return tokens, (first or end) - start, end - start


async def _user(stub: pb_grpc.RouterStub, workload: Workload, user: int, sessions: bool) -> list[Turn]:
    history, out = workload.system(), []
    session = f"bench-user-{user}" if sessions else ""
    for turn in range(workload.turns):
        history += workload.message(user, turn)
        tokens, ttft, e2e = await _turn(stub, history, workload.output_len, session)
        out.append(Turn(user, turn, len(history), ttft, e2e, tokens))
        history += tokens
    return out


async def _converse(address: str, workload: Workload, sessions: bool) -> list[Turn]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RouterStub(channel)
        per_user = await asyncio.gather(*(_user(stub, workload, u, sessions) for u in range(workload.users)))
    return [t for turns in per_user for t in turns]


async def _warm_up(address: str, count: int) -> None:
    """`count` concurrent requests of unrelated tokens (long enough for a remote prefill)."""
    rng = random.Random("warm-up")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RouterStub(channel)
        await asyncio.gather(*(_turn(stub, [rng.randrange(*TOKEN_RANGE) for _ in range(80)], 2, "")
                               for _ in range(count)))


async def _counters(cluster: LocalCluster) -> dict[str, int]:
    """Summed counters of every worker, asked directly once all are idle."""
    names = [n for n in cluster.worker_addresses if n.startswith(("prefill", "decode"))]
    fields = ("prefill_tokens_total", "prefix_hit_tokens_total", "session_restores_total",
              "session_restored_tokens_total", "requests_total")
    for _ in range(200):
        statuses = []
        for name in names:
            stub = (pb_grpc.PrefillWorkerStub if name.startswith("prefill") else pb_grpc.DecodeWorkerStub)
            async with grpc.aio.insecure_channel(cluster.worker_addresses[name]) as channel:
                statuses.append(await stub(channel).Status(pb.StatusRequest(), timeout=5))
        if all(s.running == 0 and s.waiting == 0 for s in statuses):
            return {f: sum(getattr(s, f) for s in statuses) for f in fields}
        await asyncio.sleep(0.05)
    raise RuntimeError("the workers did not go idle after the run")


def run_mode(mode: str, workload: Workload, args: argparse.Namespace, log_dir: str) -> ModeResult:
    worker_args = tuple(args.worker_arg) + (("--no-prefix-cache",) if mode == "none" else ())
    spec = ClusterSpec(num_prefill=args.prefill, num_decode=args.decode, port=free_port(), grpc_port=free_port(),
                       model=args.model, log_dir=f"{log_dir}/{mode}", worker_args=worker_args)
    result = ModeResult(mode)
    started = time.perf_counter()
    with LocalCluster(spec) as cluster:
        result.start_s = time.perf_counter() - started
        if mode == "sessions":
            reply = httpx.post(f"{cluster.http_url}/admin/pins", json={"prompt": workload.system()}, timeout=30)
            reply.raise_for_status()
        asyncio.run(_warm_up(cluster.grpc_address, 2 * (args.prefill + args.decode)))
        before = asyncio.run(_counters(cluster))
        begin = time.perf_counter()
        result.turns = asyncio.run(_converse(cluster.grpc_address, workload, sessions=mode == "sessions"))
        result.wall_s = time.perf_counter() - begin
        after = asyncio.run(_counters(cluster))
        result.counters = {name: after[name] - before[name] for name in after}
    return result


def _ms(values: list[float], q: float | None = None) -> str:
    if not values:
        return "-"
    if q is None:
        return f"{statistics.fmean(values) * 1e3:.1f}"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3:.1f}"


def report(workload: Workload, results: list[ModeResult], command: str) -> None:
    print(f"# {command}")
    print(f"# host: {platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end "
          "(shared machine); the built-in tiny model on CPU unless --model says otherwise")
    print(f"# workload: {workload}")
    print("| mode | turns | prompt tokens sent | prefill tokens computed | vs none | prefix-hit tokens | "
          "session restores | TTFT mean ms | TTFT p50 | TTFT p90 | later turns' TTFT mean | e2e mean ms | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    none = next((r for r in results if r.mode == "none"), None)
    for r in results:
        computed = r.counters["prefill_tokens_total"]
        ratio = f"{none.counters['prefill_tokens_total'] / computed:.1f}x fewer" if none and computed else "-"
        ttft = [t.ttft for t in r.turns]
        later = [t.ttft for t in r.turns if t.turn > 0]
        print(f"| {r.mode} | {len(r.turns)} | {sum(t.prompt_len for t in r.turns)} | {computed} | {ratio} | "
              f"{r.counters['prefix_hit_tokens_total']} | {r.counters['session_restores_total']} | {_ms(ttft)} | "
              f"{_ms(ttft, 0.5)} | {_ms(ttft, 0.9)} | {_ms(later)} | {_ms([t.e2e for t in r.turns])} | "
              f"{r.wall_s:.1f} |")
    outputs = [r.outputs() for r in results]
    same = all(o == outputs[0] for o in outputs[1:])
    print(f"outputs identical across modes: {'yes' if same else 'NO'} "
          f"({len(outputs[0])} replies of {workload.output_len} tokens)")
    print("prefill tokens computed and prefix-hit tokens are summed over the workers (a remote prefill counts "
          "the hits of its decode and its prefill worker both); TTFT is from sending a turn to its first token")
    print("cluster start (s): " + ", ".join(f"{r.mode} {r.start_s:.1f}" for r in results))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--system-len", type=int, default=256)
    parser.add_argument("--user-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers")
    parser.add_argument("--decode", type=int, default=2, help="decode workers")
    parser.add_argument("--model", default=None, help="model directory (default: the built-in tiny model)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for every worker, e.g. --worker-arg=--num-pages=256 (repeatable)")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    for name in ("users", "turns", "system_len", "user_len", "output_len", "decode"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.prefill < 0:
        parser.error("--prefill must be >= 0")
    args.modes = modes
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = Workload(args.users, args.turns, args.system_len, args.user_len, args.output_len, args.seed)
    with tempfile.TemporaryDirectory() as logs:
        results = [run_mode(mode, workload, args, logs) for mode in args.modes]
    command = "python -m bench.multiturn_bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    report(workload, results, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
