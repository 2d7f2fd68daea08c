"""Probe (issue 13 item 3): torch SDPA on one Llama-3.1-8B layer, 4 x 2,048 causal, with the
engine's input layout (strided q/k/v views of one qkv projection, [B, L, H, D]) against
contiguous [B, H, L, D] K/V, per SDPA backend. Prints microseconds per call (median of
back-to-back runs). GPU only: `python -m bench.attn_layout_probe`."""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, L, H, KV, D = 4, 2048, 32, 8, 128


def timed(fn, reps: int = 20, inner: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    qkv = torch.randn(B * L, (H + 2 * KV) * D, device=dev, dtype=dt)
    q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
    eng = [t.view(B, L, -1, D).transpose(1, 2) for t in (q, k, v)]  # the engine's views
    qc = q.contiguous().view(B, L, H, D).transpose(1, 2)
    kc, vc = (t.contiguous().view(B, L, KV, D).transpose(1, 2) for t in (k, v))  # BLHD, contiguous rows
    kh, vh = (t.view(B, L, KV, D).transpose(1, 2).contiguous() for t in (k, v))  # BHLD contiguous
    qh = q.view(B, L, H, D).transpose(1, 2).contiguous()
    variants = {"engine views (qkv strided, BLHD)": eng, "q,k,v contiguous BLHD": [qc, kc, vc],
                "q BLHD, K/V contiguous BHLD (bench reference)": [qc, kh, vh], "all BHLD contiguous": [qh, kh, vh]}
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    flops = 4 * H * D * B * (L * (L + 1) // 2)
    for name, (a, b, c) in variants.items():
        for bname, backend in backends.items():
            def call(a=a, b=b, c=c, backend=backend):
                if backend is None:
                    return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
            try:
                us = timed(call)
                print(f"{name:48s} {bname:9s} {us:8.1f} us  {flops / us / 1e6:7.1f} TFLOP/s", flush=True)
            except RuntimeError as exc:
                print(f"{name:48s} {bname:9s} unavailable: {str(exc).splitlines()[0][:80]}", flush=True)
    # The engine's whole call: SDPA on its views, then its output back to [tokens, H, D].
    out = F.scaled_dot_product_attention(*eng, is_causal=True, enable_gqa=True)
    print(f"engine output strides {tuple(out.stride())} (a [B, L, H, D] layout reshapes as a view: "
          f"{out.transpose(1, 2).is_contiguous()})")
    whole = lambda: F.scaled_dot_product_attention(*eng, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(  # noqa: E731
        B * L, H, D)
    only = lambda: F.scaled_dot_product_attention(*eng, is_causal=True, enable_gqa=True)  # noqa: E731
    scaled = lambda: F.scaled_dot_product_attention(*eng, is_causal=True, scale=D**-0.5, enable_gqa=True)  # noqa: E731
    for _ in range(2):
        for label, fn in (("SDPA on the engine views", only), ("same, scale given", scaled),
                          ("same, output reshaped to [tokens, H, D]", whole)):
            us = timed(fn)
            print(f"{label:48s} {us:8.1f} us  {flops / us / 1e6:7.1f} TFLOP/s", flush=True)
    # The copies a layout change would cost, for scale.
    print(f"copy K and V to BHLD: {timed(lambda: [t.view(B, L, KV, D).transpose(1, 2).contiguous() for t in (k, v)]):.1f} us")


if __name__ == "__main__":
    main()
