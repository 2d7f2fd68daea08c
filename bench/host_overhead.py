"""Host (CPU) time per overlapped decode step at batch 64: a CPU proxy for the H200 figure.

    python -m bench.host_overhead [--batch 64] [--prompt-len 1000] [--steps 100] [--rounds 5]
                                  [--path graphs|eager] [--prefix-cache] [--profile]

`bench/engine_bench.py` reports, on the GPU, the host time of one overlapped engine step
(`OverlapTimings.cpu`, waits excluded). This runs the same engine loop on the CPU with
the model's forward replaced by a stand-in that costs nothing (fixed logits), so every
remaining microsecond is host work the GPU run also pays: `Scheduler.schedule`, the
runner's input preparation (`--path graphs`, as on the H200: the decode graphs' host-side
fill of the staging buffer; `--path eager`: `ModelRunner.prepare` and the attention
backend's `prepare`), the rest of the launch (staging copy, argmax, bookkeeping,
placeholders) and the resolve (read-back, stop checks, outputs). GPU API calls (copies,
graph and kernel launches, event records) are free here and the H200 host's CPU is not
this one: a CPU proxy for the H200 figure, not that figure.

Each round adds `--batch` requests of `--prompt-len` random tokens (greedy, ignore_eos),
prefills them, runs 10 warm-up steps, times `--steps` decode steps and aborts them.
Figures: the median over all timed steps of all rounds, the lowest per-round median
(load from other work on the machine only adds time), and the per-round medians.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import random
import statistics
import sys
import time
from collections import defaultdict
from typing import Any, Callable

import torch

from engine.batch import Batch
from engine.cuda_graph import DecodeGraphs
from engine.engine import Engine
from engine.sampling_params import SamplingParams

Timings = dict[str, list[float]]


class NullModel(torch.nn.Module):
    """Stands in for the model: no compute; logits are fixed random rows (so each row
    samples its own token), as many as the batch samples. The rows are `width` wide, not
    the vocabulary: the CPU's argmax over 512-wide rows takes ~70 us at batch 64, where the
    GPU run pays one kernel launch; 16 wide it is a few us (token ids stay valid)."""

    def __init__(self, hidden_size: int, width: int, rows: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.hidden_size = hidden_size
        self.logits = torch.randn(rows, width, generator=generator)

    def forward(self, batch: Batch, attention: Any, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        rows = batch.input_ids.shape[0] if logits_indices is None else logits_indices.shape[0]
        return torch.zeros(rows, self.hidden_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[:hidden.shape[0]]


class _Done:
    """A CUDA event or graph stand-in: nothing to wait for, nothing to launch."""

    def synchronize(self) -> None: ...

    def record(self) -> None: ...

    def replay(self) -> None: ...


class HostOnlyGraphs(DecodeGraphs):
    """DecodeGraphs' host side on CPU: the same staging buffers, host fill, staging copy
    and `run`; no capture, and a replay that returns the stand-in model's fixed logits."""

    def __init__(self, engine: Engine, logits: torch.Tensor) -> None:  # no super(): no CUDA
        config = engine.config
        assert config.max_model_len is not None
        sizes = [b for b in config.cuda_graph_batch_sizes if b <= config.max_num_seqs] or [config.max_num_seqs]
        self._init_buffers(config.page_size, sizes, config.max_model_len, config.max_num_seqs, torch.device("cpu"))
        self.copied = [_Done(), _Done()]  # type: ignore[list-item]
        self.graphs = {b: (_Done(), logits[:b]) for b in self.batch_sizes}  # type: ignore[misc]


def build_engine(args: argparse.Namespace) -> Engine:
    contexts = args.prompt_len + args.steps + 20
    engine = Engine(None, device="cpu", page_size=args.page_size, max_model_len=4096,
                    num_pages=args.batch * (-(-contexts // args.page_size) + 1) + 64,
                    max_num_batched_tokens=8192, max_num_seqs=args.batch,
                    enable_prefix_cache=args.prefix_cache, overlap_schedule=True)
    cfg = engine.model_config
    model = NullModel(cfg.hidden_size, min(16, cfg.vocab_size), max(args.batch, 8192))
    engine.runner.model = model  # type: ignore[assignment]
    if args.path == "graphs":
        engine.runner.graphs = HostOnlyGraphs(engine, model.logits)
    return engine


def timed(timings: Timings, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[name].append(time.perf_counter() - start)
    return wrapper


def instrument(engine: Engine, path: str) -> Timings:
    """Wrap the timed parts on the instances (the classes stay untouched)."""
    timings: Timings = defaultdict(list)
    overlap = engine.overlap
    assert overlap is not None
    engine.scheduler.schedule = timed(timings, "schedule", engine.scheduler.schedule)  # type: ignore[method-assign]
    overlap._launch = timed(timings, "launch", overlap._launch)  # type: ignore[method-assign]
    overlap._resolve = timed(timings, "resolve", overlap._resolve)  # type: ignore[method-assign]
    runner = engine.runner
    if path == "graphs":
        graphs = runner.graphs
        assert graphs is not None
        graphs.inputs.fill = timed(timings, "prepare", graphs.inputs.fill)  # type: ignore[method-assign]
    else:
        runner.prepare = timed(timings, "prepare", runner.prepare)  # type: ignore[method-assign]
        attention = runner.attention
        attention.prepare = timed(timings, "prepare_attention", attention.prepare)  # type: ignore[method-assign]
    return timings


def uninstrument(engine: Engine) -> None:
    """Drop the instance wrappers: the class methods show through again."""
    runner = engine.runner
    graph_inputs = runner.graphs.inputs if isinstance(runner.graphs, HostOnlyGraphs) else None
    owners = [o for o in (engine.scheduler, engine.overlap, runner, graph_inputs, runner.attention) if o is not None]
    for owner in owners:
        for name in ("schedule", "_launch", "_resolve", "fill", "prepare"):
            vars(owner).pop(name, None)


def run_round(engine: Engine, args: argparse.Namespace, seed: int,
              profiler: cProfile.Profile | None = None) -> Timings:
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.steps + 100, ignore_eos=True)
    ids = [engine.add_request([rng.randrange(vocab) for _ in range(args.prompt_len)], params)
           for _ in range(args.batch)]
    scheduler = engine.scheduler
    while scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        engine.step()
    for _ in range(10):
        engine.step()
    timings = instrument(engine, args.path)
    gc.collect()
    if profiler is not None:
        profiler.enable()
    for _ in range(args.steps):
        start = time.perf_counter()
        outputs = engine.step()
        timings["step"].append(time.perf_counter() - start)
        assert len(outputs) == args.batch, "every timed step must be a full decode step"
    if profiler is not None:
        profiler.disable()
    uninstrument(engine)
    for request_id in ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    return timings


def summarize(rounds: list[Timings], args: argparse.Namespace) -> None:
    prep = ["prepare", "prepare_attention"] if args.path == "eager" else ["prepare"]

    def derived(t: Timings) -> dict[str, list[float]]:
        prepare = [sum(parts) for parts in zip(*(t[p] for p in prep))]
        return {
            "Scheduler.schedule": t["schedule"],
            "input preparation": prepare,
            "rest of launch (argmax, bookkeeping)": [a - b for a, b in zip(t["launch"], prepare)],
            "resolve (read-back, stop checks, outputs)": t["resolve"],
            "host time per step (OverlapScheduler.step)": t["step"],
        }

    per_round = [derived(t) for t in rounds]
    print(f"\n# host_overhead  path={args.path}  batch={args.batch}  prompt_len={args.prompt_len}  "
          f"page_size={args.page_size}  prefix_cache={args.prefix_cache}  torch={torch.__version__}")
    print("# command: python -m bench.host_overhead " + " ".join(sys.argv[1:]))
    print(f"# ms: median over all {args.rounds} x {args.steps} timed steps; the lowest per-round median (other "
          "load on the machine only adds time); the per-round medians")
    width = max(len(name) for name in per_round[0])
    for name in per_round[0]:
        values = [v for r in per_round for v in r[name]]
        medians = [statistics.median(r[name]) * 1e3 for r in per_round]
        rounds_text = " ".join(f"{m:.4f}" for m in medians)
        print(f"{name:<{width}}  {statistics.median(values) * 1e3:8.4f} ms  best {min(medians):.4f}  ({rounds_text})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--path", choices=("graphs", "eager"), default="graphs")
    parser.add_argument("--prefix-cache", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile one more round; top 25 by own time")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    engine = build_engine(args)
    rounds = [run_round(engine, args, seed) for seed in range(args.rounds)]
    summarize(rounds, args)
    if args.profile:
        profiler = cProfile.Profile()
        run_round(engine, args, args.rounds, profiler)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(f"\n## cProfile: {args.steps} timed steps (instrumented)\n{out.getvalue()}")


if __name__ == "__main__":
    main()
