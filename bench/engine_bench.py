"""Engine benchmark on one GPU with a real architecture and random weights.

    python -m bench.engine_bench --model llama-3.1-8b [--out results.json]

Measures, in one run: the copy bandwidth and bf16 matmul rate of this GPU (the
references); prefill throughput and MFU against that matmul rate, beside transformers'
own forward of the same weights; decode step time (CUDA graphs, eager) and the achieved
bytes per second (weights + KV read) against the copy bandwidth; and engine decode steps
at batch 64 with and without overlap scheduling, with the host time per step.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.presets import PRESETS, write_model_dir
from engine.batch import Batch, ScheduledRequest
from engine.config import ModelConfig
from engine.engine import Engine
from engine.request import Request
from engine.sampling_params import SamplingParams


@dataclass
class Row:
    section: str
    metric: str
    value: float
    unit: str
    note: str = ""


def mean_time(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    """Seconds per call over `iters` back-to-back calls (device events at both ends)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


BACK_TO_BACK = 8
INTERLEAVED_ROUNDS = 8  # alternating reference / engine timings of prefill attention (ABBA)


def median_time(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_ceilings(rows: list[Row]) -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s), both on random data."""
    src = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() * 2 / median_time(lambda: dst.copy_(src), 20)
    del src, dst
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_rate = 2 * n**3 / median_time(lambda: a @ b, 20)
    rows.append(Row("reference", "device-to-device copy (read + write)", copy_bw / 1e12, "TB/s", "2 GiB bf16, median of 20"))
    rows.append(Row("reference", "bf16 matmul 8192^3", matmul_rate / 1e12, "TFLOP/s", "random data, median of 20"))
    return copy_bw, matmul_rate


def make_requests(engine: Engine, lengths: list[int], computed: list[int], seed: int) -> list[Request]:
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    requests = []
    for i, (length, done) in enumerate(zip(lengths, computed)):
        request = Request(f"bench-{seed}-{i}", [rng.randrange(vocab) for _ in range(length)],
                          SamplingParams(temperature=0, ignore_eos=True))
        request.pages = engine.scheduler.pool.allocate(-(-length // engine.config.page_size))
        request.num_computed_tokens = done
        requests.append(request)
    return requests


def release(engine: Engine, requests: list[Request]) -> None:
    for request in requests:
        engine.scheduler.pool.free(request.pages)


def batch_of(requests: list[Request]) -> Batch:
    return Batch([ScheduledRequest.of(r, r.num_tokens - r.num_computed_tokens) for r in requests])


def linear_params(engine: Engine) -> tuple[int, int]:
    """(parameters of the decoder layers' matmuls, of the LM head)."""
    model = engine.runner.model
    layers = sum(p.numel() for n, p in model.layers.named_parameters() if n.endswith("proj.weight"))
    return layers, model.config.vocab_size * model.config.hidden_size


def bench_prefill(engine: Engine, matmul_rate: float, prompts: int, length: int,
                  rows: list[Row]) -> tuple[list[Request], torch.Tensor]:
    cfg = engine.model_config
    requests = make_requests(engine, [length] * prompts, [0] * prompts, seed=1)
    run = lambda: engine.runner.execute(batch_of(requests))  # noqa: E731
    logits = run()
    seconds = mean_time(run, iters=5)
    layer_params, head_params = linear_params(engine)
    tokens = prompts * length
    attention = attention_flops([length] * prompts, [length] * prompts, cfg.num_heads, cfg.head_dim) * cfg.num_layers
    flops = 2 * layer_params * tokens + 2 * head_params * prompts + attention
    attention = engine.runner.attention
    path = "flash varlen attention" if attention.flash_prefill else "the engine's default path (flash varlen off)"
    rows.append(Row("prefill", f"{prompts} x {length} tokens: time", seconds * 1e3, "ms",
                    f"mean of 5 back-to-back; {path}"))
    rows.append(Row("prefill", "throughput", tokens / seconds, "tokens/s"))
    rows.append(Row("prefill", "achieved", flops / seconds / 1e12, "TFLOP/s",
                    f"2*params*tokens + attention ({flops / 1e12:.1f} TFLOP)"))
    rows.append(Row("prefill", "MFU vs measured matmul rate", flops / seconds / matmul_rate, "fraction",
                    "acceptance: >= 0.80"))
    other = not attention.flash_prefill
    if other is False or flash_available(engine):  # the other path, in the same run, for information
        attention.flash_prefill, chosen = other, attention.flash_prefill
        try:
            seconds = mean_time(run, iters=5)
        finally:
            attention.flash_prefill = chosen
        rows.append(Row("prefill", f"MFU with flash varlen prefill {'on' if other else 'off'}",
                        flops / seconds / matmul_rate, "fraction", f"{seconds * 1e3:.1f} ms; for information"))
    release(engine, requests)
    return requests, logits


def flash_available(engine: Engine) -> bool:
    """Whether the opt-in FlashAttention varlen prefill path (EPD_FLASH_PREFILL=1) could
    serve this engine's cache: the benchmark times it beside the default path."""
    from engine.attention.varlen import flash_unavailable
    buffer = engine.kv_cache.buffer
    kv_heads, head_dim = buffer.shape[-2], buffer.shape[-1]
    return buffer.is_contiguous() and flash_unavailable(buffer.device, buffer.dtype, 4 * kv_heads, kv_heads,
                                                        head_dim) is None


def attention_flops(query_lens: list[int], seq_lens: list[int], heads: int, head_dim: int) -> int:
    """Causal attention FLOPs (QK^T and PV) of queries at the last positions of their sequences."""
    visible = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(query_lens, seq_lens))
    return 4 * heads * head_dim * visible


def engine_attention(engine: Engine, requests: list[Request], flash: bool) -> tuple[Callable[[], object], str]:
    """One layer of the attention the engine runs for these requests' next step, on a
    prepared batch (K/V writes excluded: the new rows are already in the pages), with the
    flash prefill path on or off; and the path's name."""
    cfg, attention = engine.model_config, engine.runner.attention
    batch = batch_of(requests)
    attention.flash_prefill, chosen = flash, attention.flash_prefill
    engine.runner.prepare(batch)
    attention.prepare(batch)
    attention.flash_prefill = chosen
    meta = batch.attention_metadata
    if meta.varlen:
        path = "flash varlen" + (" + gather" if meta.varlen.gather_rows is not None else "")
    elif meta.whole_prompts:
        path = "SDPA, one call" if len(set(meta.whole_prompts)) == 1 else "SDPA per prompt"
    else:
        path = "triton paged kernel"
    tokens = batch.num_tokens
    # q, k, v as the model hands them over: strided views of one projection's output.
    qkv = torch.randn(tokens, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, device=engine.device,
                      dtype=engine.kv_cache.buffer.dtype)
    q, k, v = qkv.split([cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2, dim=-1)
    q = q.view(tokens, cfg.num_heads, cfg.head_dim)
    k, v = (t.view(tokens, cfg.num_kv_heads, cfg.head_dim) for t in (k, v))
    return (lambda: attention._attend(0, q, k, v, batch)), path


def bench_prefill_attention(engine: Engine, prompts: int, length: int, rows: list[Row]) -> None:
    """One layer of prefill attention, 4 x 2,048 fresh prompts: the engine's path, the
    Triton prefill kernel (keys through pages) and torch's fused SDPA (contiguous keys,
    one call per sequence), same shapes; then chunks over a cached prefix (half of each
    sequence): the engine's path against the Triton kernel's."""
    import torch.nn.functional as F

    from engine.kernels.prefill_attention import prefill_attention
    cfg = engine.model_config
    requests = make_requests(engine, [length] * prompts, [0] * prompts, seed=2)
    batch = batch_of(requests)
    attention = engine.runner.attention
    attention.flash_prefill, chosen = False, attention.flash_prefill
    engine.runner.prepare(batch)
    attention.prepare(batch)
    attention.flash_prefill = chosen
    meta = batch.attention_metadata
    k_pages, v_pages = engine.kv_cache.layer_views(0)
    q = torch.randn(prompts * length, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    scale = cfg.head_dim**-0.5
    # Each timing covers BACK_TO_BACK calls, as a prefill's layers run: a call's host
    # launch overlaps the one before on the GPU (alone, a Triton launch's Python time
    # would be timed as GPU idle).
    per_call = lambda fn: median_time(lambda: [fn() for _ in range(BACK_TO_BACK)], 10) / BACK_TO_BACK  # noqa: E731
    triton_s = per_call(lambda: prefill_attention(q, k_pages, v_pages, meta.page_table, meta.query_start,
                                                  meta.seq_lens, length, scale))
    qs = q.view(prompts, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)
    # Distinct K and V (one tensor for both would halve the memory the reference reads).
    k_ref, v_ref = (torch.randn(prompts, cfg.num_kv_heads, length, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
    sdpa = lambda: [F.scaled_dot_product_attention(qs[i:i + 1], k_ref[i:i + 1], v_ref[i:i + 1],  # noqa: E731
                                                   is_causal=True, scale=scale, enable_gqa=True)
                    for i in range(prompts)]
    per_seq_s = per_call(sdpa)
    batched = lambda: F.scaled_dot_product_attention(qs, k_ref, v_ref, is_causal=True, scale=scale,  # noqa: E731
                                                     enable_gqa=True)
    batched_s = per_call(batched)
    sdpa_s = min(per_seq_s, batched_s)  # the acceptance's reference: SDPA's faster form
    flops = attention_flops([length] * prompts, [length] * prompts, cfg.num_heads, cfg.head_dim)
    tflops = lambda seconds: flops / seconds / 1e12  # noqa: E731
    section = "prefill attention"
    rows.append(Row(section, "triton paged kernel (one layer)", tflops(triton_s), "TFLOP/s",
                    f"{triton_s * 1e6:.0f} us"))
    rows.append(Row(section, "torch SDPA, contiguous K/V, one call per sequence (one layer)", tflops(per_seq_s),
                    "TFLOP/s", f"{per_seq_s * 1e6:.0f} us"))
    rows.append(Row(section, "torch SDPA, contiguous K/V, one call over the batch (one layer)", tflops(batched_s),
                    "TFLOP/s", f"{batched_s * 1e6:.0f} us"))
    engine_s, engine_fn = None, None
    for flash in engine_paths(engine, chosen):  # the engine's choice first; then the other, if it can run
        fn, path = engine_attention(engine, requests, flash)
        seconds = per_call(fn)
        if engine_s is None:
            engine_s, engine_fn = seconds, fn
        rows.append(Row(section, f"{path_label(flash, chosen)}: {path} (one layer)", tflops(seconds), "TFLOP/s",
                        f"{seconds * 1e6:.0f} us"))
    rows.append(Row(section, "engine path / torch SDPA (the faster form), timed one after the other",
                    sdpa_s / engine_s, "x", "for information: the GPU's clock drifts within a run"))
    # The acceptance's ratio from alternating runs (ABBA, medians): the GPU's clock drifts
    # over a run (one probe timed the very same cuDNN call at 268 us early and 294 us
    # later in one process), so timings taken one after another favour what ran first.
    reference = batched if batched_s <= per_seq_s else sdpa
    pairs: list[tuple[float, float]] = []
    for round_ in range(INTERLEAVED_ROUNDS):
        if round_ % 2:
            engine_t = per_call(engine_fn)
            pairs.append((per_call(reference), engine_t))
        else:
            pairs.append((per_call(reference), per_call(engine_fn)))
    ref_med, engine_med = (statistics.median(p[i] for p in pairs) for i in (0, 1))
    rows.append(Row(section, "engine path / torch SDPA (the faster form), alternating", ref_med / engine_med, "x",
                    f"medians of {INTERLEAVED_ROUNDS}: {ref_med * 1e6:.1f} / {engine_med * 1e6:.1f} us; "
                    "acceptance: >= 1"))
    cudnn_row(rows, qs, k_ref, v_ref, scale, cfg, per_call, tflops)
    release(engine, requests)
    bench_prefix_attention(engine, prompts, length, rows, per_call)


def engine_paths(engine: Engine, chosen: bool) -> list[bool]:
    """The flash setting of each engine path to time: the engine's own first."""
    return [chosen] + ([not chosen] if chosen or flash_available(engine) else [])


def path_label(flash: bool, chosen: bool) -> str:
    return "engine path" if flash == chosen else f"engine path with flash varlen {'on' if flash else 'off'}"


def cudnn_row(rows: list[Row], qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cfg: ModelConfig,
              per_call: Callable[[Callable[[], object]], float], tflops: Callable[[float], float]) -> None:
    """For information: torch SDPA forced onto cuDNN (K/V heads repeated, one call per
    sequence). Not an engine path."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    group = cfg.num_heads // cfg.num_kv_heads
    full_k, full_v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            seconds = per_call(lambda: [F.scaled_dot_product_attention(qs[i:i + 1], full_k[i:i + 1], full_v[i:i + 1],
                                                                       is_causal=True, scale=scale)
                                        for i in range(qs.shape[0])])
        rows.append(Row("prefill attention", "torch SDPA on cuDNN, K/V heads repeated (one layer)", tflops(seconds),
                        "TFLOP/s", f"{seconds * 1e6:.0f} us; for information"))
    except RuntimeError as exc:
        rows.append(Row("prefill attention", f"torch SDPA on cuDNN: unavailable ({exc})"[:100], float("nan"), ""))


def bench_prefix_attention(engine: Engine, prompts: int, length: int, rows: list[Row],
                           per_call: Callable[[Callable[[], object]], float]) -> None:
    """Chunks of length / 2 new tokens over length / 2 cached ones (their K/V in the pages)."""
    cfg = engine.model_config
    cached = length // 2
    requests = make_requests(engine, [length] * prompts, [cached] * prompts, seed=4)
    flops = attention_flops([length - cached] * prompts, [length] * prompts, cfg.num_heads, cfg.head_dim)
    chosen = engine.runner.attention.flash_prefill
    for flash in engine_paths(engine, chosen):
        fn, path = engine_attention(engine, requests, flash)
        seconds = per_call(fn)
        name = f"{prompts} x ({cached} cached + {length - cached} new), {path_label(flash, chosen)}: {path}"
        rows.append(Row("prefill attention", name, flops / seconds / 1e12, "TFLOP/s", f"{seconds * 1e6:.0f} us"))
    release(engine, requests)


def bench_transformers(engine: Engine, preset: str, requests: list[Request], ours: torch.Tensor,
                       rows: list[Row]) -> None:
    """transformers' own forward (no compile; its default attention) on the same weights."""
    import transformers
    config = transformers.AutoConfig.for_model(**PRESETS[preset])
    with torch.device(engine.device):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=engine.model_config.torch_dtype).eval()
    copy_weights(engine, hf)
    ids = torch.tensor([r.prompt_token_ids for r in requests], device=engine.device)
    with torch.inference_mode():
        run = lambda: hf(ids, logits_to_keep=1)  # noqa: E731
        logits = run().logits[:, -1]
        seconds = mean_time(run, iters=3)
    tokens = ids.numel()
    err = float((logits.double() - ours.double()).norm() / ours.double().norm())
    attn = hf.config._attn_implementation
    rows.append(Row("prefill", f"transformers {transformers.__version__} forward ({attn} attention)",
                    tokens / seconds, "tokens/s", f"{seconds * 1e3:.1f} ms; last-token logits rel. diff {err:.3f}"))
    del hf
    torch.cuda.empty_cache()


def copy_weights(engine: Engine, hf: torch.nn.Module) -> None:
    cfg = engine.model_config
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    ours = dict(engine.runner.model.named_parameters())
    with torch.no_grad():
        for name, param in hf.named_parameters():
            short = name.removeprefix("model.")
            for sub, stacked, lo, hi in (("q_proj", "qkv_proj", 0, q), ("k_proj", "qkv_proj", q, q + kv),
                                         ("v_proj", "qkv_proj", q + kv, q + 2 * kv),
                                         ("gate_proj", "gate_up_proj", 0, inter),
                                         ("up_proj", "gate_up_proj", inter, 2 * inter)):
                if f".{sub}." in short:
                    param.copy_(ours[short.replace(sub, stacked)][lo:hi])
                    break
            else:
                param.copy_(ours[short])


def print_profile(title: str, fn: Callable[[], object]) -> None:
    """Device time per kernel over 3 calls (eager: a graph shows as one item)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    print(f"\n## profile: {title} (3 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


def bench_decode(engine: Engine, copy_bw: float, batch_size: int, context: int, rows: list[Row],
                 profile: bool = False) -> None:
    cfg = engine.model_config
    requests = make_requests(engine, [context] * batch_size, [context - 1] * batch_size, seed=3 + batch_size)
    runner = engine.runner
    graph_s = mean_time(lambda: runner.execute(batch_of(requests)), iters=50, warmup=5)
    graph, _ = runner.graphs.graphs[next(b for b in runner.graphs.batch_sizes if b >= batch_size)]
    replay_s = mean_time(graph.replay, iters=50, warmup=5)
    launch_host = []
    for _ in range(20):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        launch_host.append(time.perf_counter() - start)
    rows.append(Row("decode", f"batch {batch_size}: host time of one graph launch (replay call)",
                    statistics.median(launch_host) * 1e3, "ms", "median of 20, GPU idle before each"))
    graphs, runner.graphs = runner.graphs, None
    eager_s = mean_time(lambda: runner.execute(batch_of(requests)), iters=10, warmup=2)
    if profile:
        print_profile(f"eager decode step, batch {batch_size}", lambda: runner.execute(batch_of(requests)))
    runner.graphs = graphs
    model = runner.model
    item = next(model.parameters()).element_size()
    weight_bytes = sum(p.numel() for p in model.parameters()) * item
    if model.lm_head is not None:  # the embedding table is not read, only its rows
        weight_bytes -= model.embed_tokens.weight.numel() * item - batch_size * cfg.hidden_size * item
    kv_bytes = batch_size * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * item
    name = f"batch {batch_size} x {context} context"
    note = f"{(weight_bytes + kv_bytes) / 1e9:.2f} GB/step (weights {weight_bytes / 1e9:.2f} + KV {kv_bytes / 1e9:.2f})"
    rows.append(Row("decode", f"{name}: step, CUDA graph", graph_s * 1e3, "ms", "runner.execute, mean of 50"))
    rows.append(Row("decode", f"{name}: graph replay only", replay_s * 1e3, "ms"))
    rows.append(Row("decode", f"{name}: step, eager (no graph)", eager_s * 1e3, "ms"))
    rows.append(Row("decode", f"{name}: achieved bandwidth (graph step)",
                    (weight_bytes + kv_bytes) / graph_s / copy_bw, "x copy BW", note))
    release(engine, requests)


def bench_overlap(engine: Engine, batch_size: int, prompt_len: int, steps: int, rows: list[Row],
                  profile: bool = False) -> None:
    from engine.overlap import OverlapScheduler, OverlapTimings
    rng = random.Random(5)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=4 * steps + 60, ignore_eos=True)
    for _ in range(batch_size):
        engine.add_request([rng.randrange(vocab) for _ in range(prompt_len)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()

    def timed_steps(after_warmup: Callable[[], None]) -> float:
        for _ in range(5):
            engine.step()
        after_warmup()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    first = min(r.num_tokens for r in engine.scheduler.running)
    sync_s = timed_steps(lambda: None)
    overlap = engine.overlap = OverlapScheduler(engine)
    overlap_s = timed_steps(lambda: setattr(overlap, "timings", OverlapTimings()))
    timings = overlap.timings
    if profile:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [engine.step() for _ in range(20)])
        print("\n## host profile: 20 overlapped engine steps")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(22)
    cpu = timings.cpu / timings.steps
    last = max(r.num_tokens for r in engine.scheduler.running)
    note = f"contexts {first}..{last}"
    rows.append(Row("engine decode", f"batch {batch_size}: step without overlap", sync_s * 1e3, "ms", note))
    rows.append(Row("engine decode", f"batch {batch_size}: step with overlap", overlap_s * 1e3, "ms", note))
    per_step = {name: getattr(timings, name) / timings.steps for name in ("schedule", "launch")}
    rows.append(Row("engine decode", "overlap: host time per step, all (waits excluded)", cpu * 1e3, "ms",
                    f"{cpu / overlap_s:.1%} of the step"))
    rows.append(Row("engine decode", "overlap: host scheduling (Scheduler.schedule)", per_step["schedule"] * 1e3, "ms",
                    f"{per_step['schedule'] / overlap_s:.1%} of the step"))
    rows.append(Row("engine decode", "overlap: host input prep + graph launch", per_step["launch"] * 1e3, "ms",
                    f"{per_step['launch'] / overlap_s:.1%} of the step"))
    rows.append(Row("engine decode", "overlap: host read-back + stop checks + outputs",
                    (cpu - per_step["schedule"] - per_step["launch"]) * 1e3, "ms"))


def main(argv: list[str] | None = None) -> None:
    # The acceptance rows time the engine's default paths; the opt-in flash varlen prefill
    # path (EPD_FLASH_PREFILL=1) is timed beside them where it can run.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="llama-3.1-8b")
    parser.add_argument("--prefill", default="4x2048", help="prompts x tokens")
    parser.add_argument("--decode-context", type=int, default=1024)
    parser.add_argument("--decode-batches", default="1,64")
    parser.add_argument("--overlap-steps", type=int, default=50)
    parser.add_argument("--skip", default="", help="comma list of: transformers,overlap,attention")
    parser.add_argument("--profile", action="store_true", help="print per-kernel times of eager steps")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    prompts, length = (int(x) for x in args.prefill.split("x"))
    batches = [int(b) for b in args.decode_batches.split(",")]
    rows: list[Row] = []
    copy_bw, matmul_rate = measure_ceilings(rows)
    tokens_needed = max(prompts * length, max(batches) * (args.decode_context + 4 * args.overlap_steps + 64))
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(write_model_dir(args.model, Path(tmp) / args.model), device="cuda", dtype="bfloat16",
                        load_format="dummy", attention_backend="triton", triton_kernels=True, cuda_graphs=True,
                        cuda_graph_batch_sizes=tuple(sorted({1, 2, 4, 8, 16, 32, *batches})),
                        page_size=16, num_pages=tokens_needed // 16 + 64, max_model_len=4096,
                        max_num_batched_tokens=8192, max_num_seqs=max(batches), enable_prefix_cache=False)
    engine.kv_cache.buffer.normal_()  # never time attention on zeros
    requests, logits = guarded(rows, "prefill", lambda: bench_prefill(engine, matmul_rate, prompts, length, rows))
    if "attention" not in skip:
        guarded(rows, "prefill attention", lambda: bench_prefill_attention(engine, prompts, length, rows))
    if "transformers" not in skip and logits is not None:
        guarded(rows, "transformers", lambda: bench_transformers(engine, args.model, requests, logits, rows))
    for batch_size in batches:
        guarded(rows, "decode", lambda: bench_decode(engine, copy_bw, batch_size, args.decode_context, rows,
                                                     args.profile))
    if "overlap" not in skip:
        guarded(rows, "overlap", lambda: bench_overlap(engine, max(batches), args.decode_context - 24,
                                                      args.overlap_steps, rows, args.profile))
    report(rows, args)


def guarded(rows: list[Row], section: str, fn: Callable[[], object]) -> object:
    """Run one section; a failure is printed and recorded, and the others still run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what broke and goes on
        traceback.print_exc()
        rows.append(Row(section, f"FAILED: {exc!r}"[:120], float("nan"), ""))
        return (None, None) if section == "prefill" else None


def report(rows: list[Row], args: argparse.Namespace) -> None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n# engine_bench  model={args.model}  device={name}  torch={torch.__version__}")
    print("# command: python -m bench.engine_bench " + " ".join(sys.argv[1:]))
    width = max(len(f"{r.section}: {r.metric}") for r in rows)
    for r in rows:
        print(f"{r.section + ': ' + r.metric:<{width}}  {r.value:>12.4g} {r.unit:<9} {r.note}")
    if args.out:
        args.out.write_text(json.dumps({"device": name, "argv": sys.argv, "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
