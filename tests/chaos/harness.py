"""The chaos harness: a real cluster (router and workers as processes, deploy.local),
a streaming load of greedy requests driven from a background thread, seeded fault
injection (SIGKILL and restart of any process, transfer stalls and dropped transfer
connections through the tcp backend's fault hooks, client disconnects), and the checks
every chaos test ends with (outputs against the offline engine, pages all free or
cached once idle).

Prompts are token ids so that gRPC outputs compare token for token; HTTP requests
(every `http_every`-th) stream SSE text, compared with the offline text, which checks
the router's incremental detokenizer across migrations too.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from deploy.local import ClusterSpec, LocalCluster
from engine import LLM, SamplingParams
from kv_transfer.faults import DROP_ENV, STALL_ENV
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from worker.config import free_port

SEED = int(os.environ.get("EPD_CHAOS_SEED", "14"))  # every random choice of a chaos run derives from it
ERROR_BACKOFF_S = 0.2  # a load client that got an error waits this long before its next request


@dataclass(frozen=True)
class Reference:
    """The offline engine's greedy output of each prompt."""

    tokens: list[list[int]]
    texts: list[str]


def offline(prompts: list[list[int]], max_tokens: int, model: str | None = None) -> Reference:
    llm = LLM(model)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = [r.outputs[0] for r in llm.generate(prompts, params)]
    return Reference([o.token_ids for o in outs], [o.text for o in outs])


def make_prompts(seed: int, count: int, low: int = 80, high: int = 200) -> list[list[int]]:
    """Long enough for a remote prefill (decode's local threshold is 64 tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(low, high))] for _ in range(count)]


class ChaosCluster(LocalCluster):
    """A LocalCluster whose workers register with the router (a restarted router learns
    them again) and whose prefill workers have the tcp fault hooks armed, each with its
    own trigger files under `faults_dir` (inert until a file is created)."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.faults_dir = tmp_path / "faults"
        self.faults_dir.mkdir(parents=True, exist_ok=True)
        num_prefill = overrides.get("num_prefill", 1)
        hooks = {f"prefill-{i}": {STALL_ENV: str(self.fault_file(f"prefill-{i}", "stall")),
                                  DROP_ENV: str(self.fault_file(f"prefill-{i}", "drop"))}
                 for i in range(num_prefill)}
        spec = ClusterSpec(port=free_port(), grpc_port=free_port(), log_dir=str(tmp_path / "logs"),
                           register_workers=True, process_env=hooks, **overrides)
        super().__init__(spec)

    def fault_file(self, name: str, kind: str) -> Path:
        return self.faults_dir / f"{name}.{kind}"

    def sigkill(self, name: str) -> None:
        proc = self.processes[name]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def workers(self) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.http_url}/cluster", timeout=5.0).json()
        return body["workers"] if isinstance(body, dict) else body

    def worker(self, worker_id: str) -> dict[str, Any] | None:
        return next((w for w in self.workers() if w["id"] == worker_id), None)

    def wait_routable(self, worker_id: str, timeout_s: float = 60.0, closed: bool = False) -> None:
        """The worker's current process serves, the router has polled it since it started
        (a quick restart may never have been seen down: its entry could be the killed
        process's), it is healthy there and its breaker not open: new requests may go to
        it (a half-open breaker lets the next one through as its probe). `closed`: until
        a call through it succeeded."""
        states = ("closed",) if closed else ("closed", "half_open")

        def routable() -> bool:
            own = self.own_status(worker_id)
            entry = self.worker(worker_id)
            return (own is not None and entry is not None and entry["healthy"] and entry["breaker"] in states
                    and entry["requests_total"] == own.requests_total)
        wait_for(routable, timeout_s, 0.2)

    def own_status(self, worker_id: str) -> pb.WorkerStatus | None:
        """The worker's Status, asked directly (None while it does not answer)."""
        role = worker_id.rsplit("-", 1)[0]
        stub = {"encode": pb_grpc.EncodeWorkerStub, "prefill": pb_grpc.PrefillWorkerStub,
                "decode": pb_grpc.DecodeWorkerStub}[role]

        async def ask() -> pb.WorkerStatus:
            async with grpc.aio.insecure_channel(self.worker_addresses[worker_id]) as channel:
                return await stub(channel).Status(pb.StatusRequest(), timeout=2.0)
        try:
            return asyncio.run(ask())
        except grpc.aio.AioRpcError:
            return None


def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.1) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - start


@dataclass
class Outcome:
    index: int  # which prompt
    via: str  # "grpc" or "http"
    started: float
    ended: float = 0.0
    tokens: list[int] = field(default_factory=list)  # gRPC
    text: str = ""  # HTTP (SSE)
    error: str | None = None
    error_kind: str = ""  # the gRPC status name or the HTTP client's exception type

    @property
    def latency(self) -> float:
        return self.ended - self.started


class StreamingLoad:
    """`total` streaming greedy requests over `prompts` (cycled), `concurrency` at a
    time, in a background thread with its own event loop."""

    def __init__(self, cluster: LocalCluster, prompts: list[list[int]], max_tokens: int, total: int,
                 concurrency: int, http_every: int = 4, timeout_s: float = 120.0) -> None:
        self.cluster, self.prompts, self.max_tokens = cluster, prompts, max_tokens
        self.total, self.concurrency, self.http_every, self.timeout_s = total, concurrency, http_every, timeout_s
        self.outcomes: list[Outcome] = []
        self._next = 0
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> StreamingLoad:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:  # the test failed meanwhile: fail now, not after `total` more requests
            self.stop()
        self.join()

    @property
    def completed(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def join(self, timeout_s: float = 600.0) -> list[Outcome]:
        self._thread.join(timeout=timeout_s)
        assert not self._thread.is_alive(), f"the load did not finish within {timeout_s} s"
        return self.outcomes

    def stop(self) -> None:
        """Start no more requests (those running finish)."""
        self._stopped.set()

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.total or self._stopped.is_set():
                return None
            self._next += 1
            return self._next - 1

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.cluster.grpc_address) as channel, \
                httpx.AsyncClient(base_url=self.cluster.http_url, timeout=self.timeout_s) as http:
            stub = pb_grpc.RouterStub(channel)
            await asyncio.gather(*(self._client(stub, http) for _ in range(self.concurrency)))

    async def _client(self, stub: pb_grpc.RouterStub, http: httpx.AsyncClient) -> None:
        while (number := self._take()) is not None:
            index = number % len(self.prompts)
            use_http = self.http_every > 0 and number % self.http_every == self.http_every - 1
            outcome = Outcome(index, "http" if use_http else "grpc", time.monotonic())
            try:
                await (self._http(http, outcome) if use_http else self._grpc(stub, outcome))
            except grpc.aio.AioRpcError as exc:
                outcome.error, outcome.error_kind = f"{exc.code().name}: {exc.details()}", exc.code().name
            except httpx.HTTPError as exc:
                outcome.error, outcome.error_kind = f"{type(exc).__name__}: {exc}", type(exc).__name__
            outcome.ended = time.monotonic()
            with self._lock:
                self.outcomes.append(outcome)
            if outcome.error is not None:
                await asyncio.sleep(ERROR_BACKOFF_S)  # a router that is down refuses at once

    async def _grpc(self, stub: pb_grpc.RouterStub, outcome: Outcome) -> None:
        request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=self.max_tokens, temperature=0.0,
                                                                 ignore_eos=True))
        request.token_ids.ids.extend(self.prompts[outcome.index])
        async for response in stub.Generate(request, timeout=self.timeout_s):
            if response.HasField("chunk"):
                outcome.tokens.extend(response.chunk.token_ids)
                continue
            if response.finished.reason != pb.FINISH_REASON_LENGTH:
                outcome.error = f"finished with {response.finished}"
            return
        outcome.error = "stream ended without a finish"

    async def _http(self, http: httpx.AsyncClient, outcome: Outcome) -> None:
        body = {"prompt": self.prompts[outcome.index], "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                outcome.error_kind = f"HTTP {response.status_code}"
                return
            finish = None
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    outcome.error = str(event["error"])
                    return
                choice = event["choices"][0]
                outcome.text += choice["text"]
                finish = choice.get("finish_reason") or finish
            if finish != "length":
                outcome.error = f"finish_reason {finish!r}"


def mismatches(outcomes: list[Outcome], reference: Reference) -> list[Outcome]:
    """Completed requests whose output differs from the offline engine's."""
    return [o for o in outcomes if o.error is None and (
        o.text != reference.texts[o.index] if o.via == "http" else o.tokens != reference.tokens[o.index])]


def assert_all_correct(outcomes: list[Outcome], reference: Reference, total: int) -> None:
    failed = [o for o in outcomes if o.error is not None]
    assert len(outcomes) == total, (len(outcomes), total)
    assert not failed, f"{len(failed)} of {total} requests failed, e.g. {[(o.index, o.error) for o in failed[:3]]}"
    wrong = mismatches(outcomes, reference)
    assert not wrong, f"{len(wrong)} outputs differ from the offline engine, e.g. prompt {wrong[0].index}"


def assert_pages_clean(cluster: ChaosCluster, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """Once idle, every live prefill and decode worker's pages are free or in its prefix
    cache (the router's view, refreshed by Status twice a second)."""
    def clean() -> bool:
        workers = [w for w in cluster.workers() if w["role"] in ("prefill", "decode") and w["healthy"]]
        return all(w["running"] == 0 and w["waiting"] == 0
                   and w["kv_pages_free"] + w["kv_pages_cached"] == w["kv_pages_total"] for w in workers)
    try:
        wait_for(clean, timeout_s, 0.2)
    except TimeoutError:
        raise AssertionError(f"pages still held {timeout_s} s after the load: {cluster.workers()}") from None
    return cluster.workers()


async def worker_metrics(cluster: ChaosCluster, worker_id: str) -> dict[tuple[str, str], float]:
    """A worker's own /metrics: (sample name, peer label) -> value ("" unlabelled)."""
    from prometheus_client.parser import text_string_to_metric_families
    entry = cluster.worker(worker_id)
    assert entry is not None
    stub = (pb_grpc.PrefillWorkerStub if entry["role"] == "prefill" else pb_grpc.DecodeWorkerStub)
    async with grpc.aio.insecure_channel(entry["address"]) as channel:
        status = await stub(channel).Status(pb.StatusRequest(), timeout=5.0)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://{status.metrics_address}/metrics", timeout=5.0)).text
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            peer = sample.labels.get("prefill") or sample.labels.get("decode") or ""
            values[(sample.name, peer)] = values.get((sample.name, peer), 0.0) + sample.value
    return values


def total(values: dict[tuple[str, str], float], name: str) -> float:
    """A sample summed over its peer labels."""
    return sum(v for (n, _), v in values.items() if n == name)


async def flush_caches(cluster: ChaosCluster) -> None:
    """Empty every prefill and decode worker's prefix cache (FlushCache)."""
    for worker in cluster.workers():
        if worker["role"] not in ("prefill", "decode"):
            continue
        async with grpc.aio.insecure_channel(worker["address"]) as channel:
            stub = (pb_grpc.PrefillWorkerStub if worker["role"] == "prefill" else pb_grpc.DecodeWorkerStub)(channel)
            await stub.FlushCache(pb.FlushCacheRequest(), timeout=10.0)


def rng_for(test: str) -> random.Random:
    """This test's seeded choices (victims, moments); print the seed to replay a run."""
    print(f"chaos seed {SEED} ({test}); replay with EPD_CHAOS_SEED={SEED}")
    return random.Random(f"{SEED}:{test}")
