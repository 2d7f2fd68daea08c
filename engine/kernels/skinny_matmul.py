"""x @ W^T for a handful of rows (decode at small batch): a weight-streaming kernel.

At batch 1..16 a linear layer only streams its weight once; cuBLAS picks split-K
kernels plus a reduce kernel for the 4096-wide layers. Here each program owns BLOCK_N
output columns and walks the whole K, so the weight is read once, in 16-byte rows, with
`num_stages` tiles in flight, and no reduction pass follows. The rows sit in the M side
of a 16-row `tl.dot` (padding rows are masked loads of zeros). (A persistent variant, one
program per SM walking several column blocks in one flat loop, measured slower at every
layer shape: e.g. gate_up 81.3 vs 66.9 us.)

Two fusions take the decode layer's small kernels off the chain at small batch:
- `residual_out`: the output is added to the residual stream in place (each program
  owns its columns) and each program writes the sum of squares of its columns of the new
  stream, one float per row and column block;
- `norm_in`: the input is RMS-normalised on the fly from those per-block sums (summed in
  a fixed order: deterministic) and the norm weight, with the reference's roundings.
So `add + RMSNorm` between a layer's projections costs no launch of its own.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels import pdl

MAX_ROWS = 16


class SkinnyConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@triton.jit
def _skinny_matmul_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, ssq_in_ptr, norm_w_ptr, ssq_out_ptr,
                          rows, n, k, stride_x, stride_w, stride_out, stride_ssq_in, stride_ssq_out,
                          in_parts, eps,
                          HAS_BIAS: tl.constexpr, NORM_IN: tl.constexpr, RESIDUAL_OUT: tl.constexpr,
                          PARTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    block = tl.program_id(0)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row_ids = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    row_mask = row_ids < rows
    col_mask = cols < n
    if NORM_IN:
        parts = tl.arange(0, PARTS)
        ssq = tl.load(ssq_in_ptr + row_ids[:, None] * stride_ssq_in + parts[None, :],
                      mask=row_mask[:, None] & (parts < in_parts)[None, :], other=0.0)
        inv_rms = tl.rsqrt(tl.sum(ssq, axis=1) / k + eps)
    x_ptrs = x_ptr + row_ids[:, None] * stride_x + ks[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        k_mask = (k0 + ks) < k
        x = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if NORM_IN:
            # The reference rounds the normalised row before the weight, then the product.
            norm_w = tl.load(norm_w_ptr + k0 + ks, mask=k_mask, other=0.0).to(tl.float32)
            normed = (x.to(tl.float32) * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
            x = (normed * norm_w[None, :]).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptrs + k0, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + row_ids[:, None] * stride_out + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    if RESIDUAL_OUT:
        # `stream + linear(x)`, rounded as the reference's bf16 add is.
        total = (tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
                 + y.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs, total, mask=out_mask)
        squares = total.to(tl.float32)
        tl.store(ssq_out_ptr + row_ids * stride_ssq_out + block, tl.sum(squares * squares, axis=1), mask=row_mask)
    else:
        tl.store(out_ptrs, y, mask=out_mask)


def default_config(n: int, k: int, on_gpu: bool) -> SkinnyConfig:
    """Tiles picked from bench/kernel_sweep.py on an H200 (BENCHMARKS.md)."""
    if not on_gpu:
        return SkinnyConfig(16, 16, 4, 1)
    if n >= 65536:  # LM heads
        return SkinnyConfig(64, 128, 4, 5)
    return SkinnyConfig(32, 512 if k >= 8192 else 256, 4, 5)


def wins_over_cublas(n: int) -> bool:
    """Where the sweep measured this kernel faster than cuBLAS at 1..16 rows: narrow
    outputs (cuBLAS takes split-K plus a reduce kernel there) and LM heads; equal or
    slower in between. (Taking every width under PDL, so that no cuBLAS kernel breaks
    the chain of early launches, measured slower at batch 1: 4.601 vs 4.511 ms.)"""
    return n <= 4096 or n >= 65536


def column_blocks(n: int, k: int, device: torch.device) -> int:
    """How many per-block sums of squares a `residual_out` call writes per row."""
    return triton.cdiv(n, default_config(n, k, device.type == "cuda").block_n)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            config: SkinnyConfig | None, ssq_in: torch.Tensor | None = None,
            norm_weight: torch.Tensor | None = None, eps: float = 0.0,
            ssq_out: torch.Tensor | None = None) -> None:
    rows, k = x.shape
    n = weight.shape[0]
    assert rows <= MAX_ROWS and x.stride(-1) == 1 and weight.stride(-1) == 1 and out.stride(-1) == 1
    config = config or default_config(n, k, x.is_cuda)
    blocks = triton.cdiv(n, config.block_n)
    if ssq_out is not None:
        assert ssq_out.shape[0] >= rows and ssq_out.shape[1] >= blocks and ssq_out.dtype == torch.float32
    parts = ssq_in.shape[1] if ssq_in is not None else 1
    _skinny_matmul_kernel[(blocks,)](
        x, weight, bias if bias is not None else weight, out,
        ssq_in if ssq_in is not None else out, norm_weight if norm_weight is not None else weight,
        ssq_out if ssq_out is not None else out,
        rows, n, k, x.stride(0), weight.stride(0), out.stride(0),
        ssq_in.stride(0) if ssq_in is not None else 0, ssq_out.stride(0) if ssq_out is not None else 0,
        parts, eps, HAS_BIAS=bias is not None, NORM_IN=ssq_in is not None,
        RESIDUAL_OUT=ssq_out is not None, PARTS=triton.next_power_of_2(parts),
        BLOCK_M=MAX_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch(x))


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """x [M <= 16, K] @ weight[N, K]^T (+ bias) -> [M, N]."""
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    _launch(x, weight, bias, out, config)
    return out


def norm_matmul(stream: torch.Tensor, ssq: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: SkinnyConfig | None = None) -> torch.Tensor:
    """rms_norm(stream) @ weight^T (+ bias), where ssq [M, P] holds partial sums of the
    squares of each row of `stream` (they add up to the row's sum of squares)."""
    out = torch.empty((stream.shape[0], weight.shape[0]), dtype=stream.dtype, device=stream.device)
    _launch(stream, weight, bias, out, config, ssq, norm_weight, eps)
    return out


def matmul_add_(stream: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                config: SkinnyConfig | None = None) -> torch.Tensor:
    """stream += x @ weight^T in place (bf16 add, as `stream + linear(x)`); returns the
    partial sums of squares of the new stream's rows [M, column blocks] (fp32)."""
    n, k = weight.shape
    config = config or default_config(n, k, x.is_cuda)
    assert stream.shape == (x.shape[0], n)
    ssq = torch.empty((x.shape[0], triton.cdiv(n, config.block_n)), dtype=torch.float32, device=x.device)
    _launch(x, weight, None, stream, config, ssq_out=ssq)
    return ssq
