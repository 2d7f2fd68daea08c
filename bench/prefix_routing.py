"""Prefix-aware routing against round-robin on a workload built to reward it.

4 prefill workers whose page pools each hold the prefixes of only 2 of 8 groups; 8
groups x 25 requests sharing their group's long prefix, in random order. For each
policy a fresh cluster serves the same requests; the script prints the prefix-cache hit
tokens measured on the prefill workers and each worker's share of the requests.

    python -m bench.prefix_routing [--policies prefix_aware,round_robin]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sys
import tempfile
from dataclasses import dataclass

import httpx

from deploy.local import ClusterSpec, LocalCluster
from proto import epd_pb2 as pb
from worker.config import free_port


@dataclass(frozen=True)
class Workload:
    groups: int = 8
    per_group: int = 25
    prefix_tokens: int = 256
    suffix_tokens: int = 16
    page_size: int = 16
    concurrency: int = 8
    seed: int = 0

    def requests(self) -> list[list[int]]:
        rng = random.Random(self.seed)
        prefixes = [[rng.randrange(3, 500) for _ in range(self.prefix_tokens)] for _ in range(self.groups)]
        work = [prefixes[g] + [rng.randrange(3, 500) for _ in range(self.suffix_tokens)]
                for g in range(self.groups) for _ in range(self.per_group)]
        rng.shuffle(work)
        return work

    def prefill_pages(self) -> int:
        """Room for two groups' prefixes plus one request computing beside them: a
        third prefix cannot stay cached."""
        prefix_pages = self.prefix_tokens // self.page_size
        request_pages = -(-(self.prefix_tokens + self.suffix_tokens) // self.page_size)
        return 2 * prefix_pages + request_pages


async def _send(address: str, prompts: list[list[int]], concurrency: int) -> None:
    import grpc

    from proto import epd_pb2_grpc as pb_grpc
    limit = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RouterStub(channel)

        async def one(prompt: list[int]) -> None:
            async with limit:
                request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=1, temperature=0.0))
                request.token_ids.ids.extend(prompt)
                async for _ in stub.Generate(request, timeout=120):
                    pass

        await asyncio.gather(*(one(p) for p in prompts))


def run_policy(policy: str, workload: Workload, log_dir: str) -> dict[str, object]:
    spec = ClusterSpec(num_prefill=4, num_decode=1, port=free_port(), grpc_port=free_port(), policy=policy,
                       local_prefill_threshold=0, log_dir=f"{log_dir}/{policy}",
                       worker_args=("--page-size", str(workload.page_size)),
                       prefill_args=("--num-pages", str(workload.prefill_pages())))
    with LocalCluster(spec) as cluster:
        asyncio.run(_send(cluster.grpc_address, workload.requests(), workload.concurrency))
        workers = httpx.get(f"{cluster.http_url}/cluster", timeout=10).json()
    workers = workers["workers"] if isinstance(workers, dict) else workers
    prefill = [w for w in workers if w["role"] == "prefill"]
    total = sum(w["requests_total"] for w in prefill)
    return {"policy": policy, "hit_tokens": sum(w.get("prefix_hit_tokens_total", 0) for w in prefill),
            "computed_tokens": sum(w["prefill_tokens_total"] for w in prefill),
            "shares": [round(w["requests_total"] / max(total, 1), 3) for w in prefill], "requests": total,
            "prefill_pages": workload.prefill_pages()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="prefix_aware,round_robin")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workload = Workload(seed=args.seed)
    results = []
    with tempfile.TemporaryDirectory() as logs:
        for policy in args.policies.split(","):
            results.append(run_policy(policy, workload, logs))
    print(f"command: python -m bench.prefix_routing {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"workload: {workload}")
    print(f"{'policy':<14} {'hit tokens':>10} {'computed':>9} {'requests':>8} {'max share':>9}  shares")
    for r in results:
        print(f"{r['policy']:<14} {r['hit_tokens']:>10} {r['computed_tokens']:>9} {r['requests']:>8} {max(r['shares']):>9}  {r['shares']}")
    if len(results) >= 2 and results[1]["hit_tokens"]:
        print(f"hit-token ratio {results[0]['policy']}/{results[1]['policy']}: "
              f"{results[0]['hit_tokens'] / results[1]['hit_tokens']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
