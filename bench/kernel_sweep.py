"""Tile-size sweeps for the Triton kernels whose defaults were picked by measurement.

    python -m bench.kernel_sweep [--model llama-3.1-8b]

Skinny matmul (decode rows x weight) against cuBLAS on the model's layer shapes, timed
as replays of a CUDA graph over several weight copies (as in a decode step, the weights
do not stay in L2); prefill attention tile shapes on 4 x 2048 paged tokens.
"""
from __future__ import annotations

import argparse
import itertools
import statistics

import torch
import torch.nn.functional as F

from bench.presets import PRESETS
from engine.kernels.decode_attention import decode_attention
from engine.kernels.prefill_attention import PrefillConfig, prefill_attention
from engine.kernels.skinny_matmul import SkinnyConfig, default_config, skinny_matmul


def graph_time(calls: list, repeats: int = 20) -> float:
    """Seconds per call: a CUDA graph of all `calls`, replayed `repeats` times."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def layer_shapes(model: str) -> dict[str, tuple[int, int]]:
    c = PRESETS[model]
    h, heads, kv, d, i = (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
                          c["head_dim"], c["intermediate_size"])
    return {"qkv": ((heads + 2 * kv) * d, h), "o": (h, heads * d), "gate_up": (2 * i, h),
            "down": (h, i), "lm_head": (c["vocab_size"], h)}


def sweep_skinny(model: str, rows_list: list[int]) -> None:
    configs = [SkinnyConfig(bn, bk, w, st) for bn, bk, w, st in
               itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 5))]
    for name, (n, k) in layer_shapes(model).items():
        copies = max(1, (256 * 2**20) // (n * k * 2))  # >= 256 MiB of weights per round
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            cublas = graph_time([lambda w=w: F.linear(x, w) for w in weights])
            results = []
            for config in configs:
                try:
                    results.append((graph_time([lambda w=w: skinny_matmul(x, w, config=config) for w in weights]), config))
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                    print(f"  {config}: {type(exc).__name__}")
            results.sort()
            tb = n * k * 2 / 1e12
            default = default_config(n, k, True)
            seconds = next(t for t, c in results if c == default)
            print(f"skinny {name:8s} M={rows:<3d} default tiles {tuple(default)} {seconds * 1e6:7.1f} us "
                  f"({tb / seconds:5.2f} TB/s)")
            best_s, best = results[0]
            print(f"skinny {name:8s} M={rows:<3d} N={n:<6d} K={k:<5d} cuBLAS {cublas * 1e6:7.1f} us "
                  f"({tb / cublas:5.2f} TB/s)  best {best_s * 1e6:7.1f} us ({tb / best_s:5.2f} TB/s) {tuple(best)}  "
                  f"next {[(round(t * 1e6, 1), tuple(c)) for t, c in results[1:4]]}")
        del weights


def sweep_prefill(model: str, prompts: int = 4, length: int = 2048) -> None:
    c = PRESETS[model]
    heads, kv, d, page = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], 16
    pages = prompts * length // page
    k_pages = torch.randn(pages, page, kv, d, device="cuda", dtype=torch.bfloat16)
    v_pages = torch.randn_like(k_pages)
    page_table = torch.randperm(pages, device="cuda", dtype=torch.int32).view(prompts, -1)
    seq_lens = torch.full((prompts,), length, device="cuda", dtype=torch.int32)
    query_start = torch.arange(0, (prompts + 1) * length, length, device="cuda", dtype=torch.int32)
    q = torch.randn(prompts * length, heads, d, device="cuda", dtype=torch.bfloat16)
    flops = prompts * length * (length + 1) // 2 * 4 * heads * d
    import torch.nn.functional as F
    qs = q.view(prompts, length, heads, d).transpose(1, 2)
    kv_t = torch.randn(prompts, kv, length, d, device="cuda", dtype=torch.bfloat16)
    sdpa = graph_time([lambda: [F.scaled_dot_product_attention(qs[i:i + 1], kv_t[i:i + 1], kv_t[i:i + 1], is_causal=True,
                                                               scale=d**-0.5, enable_gqa=True)
                                for i in range(prompts)]], repeats=10)
    print(f"prefill attention: torch SDPA, contiguous K/V, same harness: {sdpa * 1e6:7.0f} us  "
          f"{flops / sdpa / 1e12:6.1f} TFLOP/s")
    for config in [PrefillConfig(*v) for v in ((128, 32, 4, 4), (128, 32, 4, 4, True), (128, 64, 4, 3, True),
                                                (128, 64, 8, 3), (128, 64, 8, 3, True), (128, 128, 8, 3, True),
                                                (128, 32, 4, 3), (128, 32, 4, 5), (128, 64, 4, 4), (128, 64, 8, 4),
                                                (64, 64, 4, 3), (64, 32, 4, 4), (128, 32, 8, 4))]:
        try:
            seconds = graph_time([lambda: prefill_attention(q, k_pages, v_pages, page_table, query_start,
                                                            seq_lens, length, d**-0.5, config)], repeats=10)
            print(f"prefill attention {tuple(config)}: {seconds * 1e6:7.0f} us  {flops / seconds / 1e12:6.1f} TFLOP/s")
        except Exception as exc:  # noqa: BLE001
            print(f"prefill attention {tuple(config)}: {type(exc).__name__}: {exc}"[:200])


def sweep_decode_splits(model: str, context: int = 1024) -> None:
    """Split-K counts of the decode kernel (merge kernel included when splits > 1)."""
    c = PRESETS[model]
    heads, kv, d, page = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], 16
    for batch, choices in ((1, (8, 12, 16, 17, 24, 33)), (64, (1, 2, 4))):
        pages = batch * context // page
        k_pages = torch.randn(pages, page, kv, d, device="cuda", dtype=torch.bfloat16)
        v_pages = torch.randn_like(k_pages)
        page_table = torch.randperm(pages, device="cuda", dtype=torch.int32).view(batch, -1)
        seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, heads, d, device="cuda", dtype=torch.bfloat16)
        tb = 2 * k_pages.numel() * 2 / 1e12
        for splits in choices:
            seconds = graph_time([lambda s=splits: decode_attention(q, k_pages, v_pages, page_table, seq_lens,
                                                                   d**-0.5, s)] * 8)
            print(f"decode attention batch {batch} x {context}, {splits} splits: {seconds * 1e6:6.1f} us "
                  f"({tb / seconds:.2f} TB/s of K/V; L2-resident at batch 1)")
        del k_pages, v_pages


SWEEPS = ("decode", "prefill", "skinny")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="llama-3.1-8b")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--only", default=",".join(SWEEPS), help=f"comma list of: {','.join(SWEEPS)}")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if unknown := only - set(SWEEPS):
        parser.error(f"unknown sweeps {sorted(unknown)}; choose from {SWEEPS}")
    rows = [int(r) for r in args.rows.split(",")]
    if "decode" in only:
        sweep_decode_splits(args.model)
    if "prefill" in only:
        sweep_prefill(args.model)
    if "skinny" in only:
        sweep_skinny(args.model, rows)


if __name__ == "__main__":
    main()
