"""x @ W^T for a handful of rows (decode at small batch): a weight-streaming kernel.

At batch 1..16 a linear layer only streams its weight once; cuBLAS picks split-K
kernels plus a reduce kernel for the 4096-wide layers. Here each program owns BLOCK_N
output columns and walks the whole K, so the weight is read once, in 16-byte rows, with
`num_stages` tiles in flight, and no reduction pass follows. The rows sit in the M side
of a 16-row `tl.dot` (padding rows are masked loads of zeros).

Measured and not kept (BENCHMARKS.md): a persistent variant (one program per SM walking
column blocks in one flat loop); RMSNorm fused into the k loop of the projection after
it plus the residual add into the epilogue of the one before (a layer half of
o + add/norm + gate_up took 73-86 us fused against 71 us as separate PDL kernels).
"""
from __future__ import annotations

import os
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
def _skinny_matmul_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, rows, n, k, stride_x, stride_w, stride_out,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row_ids = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    row_mask = row_ids < rows
    col_mask = cols < n
    x_ptrs = x_ptr + row_ids[:, None] * stride_x + ks[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        k_mask = (k0 + ks) < k
        x = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + row_ids[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def default_config(n: int, k: int, on_gpu: bool, element_size: int = 2) -> SkinnyConfig:
    """Tiles picked per layer width from bench/kernel_sweep.py on H200s (BENCHMARKS.md),
    for 16-bit weights; wider elements get proportionally shorter k tiles, so the
    pipeline's stages keep fitting in shared memory (float32 at (32, 512, 5 stages)
    would need 384 KiB)."""
    if not on_gpu:
        return SkinnyConfig(16, 16, 4, 1)
    if n >= 65536:  # LM heads
        config = SkinnyConfig(64, 128, 4, 3)
    elif n > 16384:  # stacked gate/up projections
        config = SkinnyConfig(32, 128, 4, 3)
    elif n > 4096:  # stacked q/k/v projections
        config = SkinnyConfig(64, 128, 4, 5)
    else:
        config = SkinnyConfig(32, 512, 4, 5)
    if element_size > 2:
        config = config._replace(block_k=max(32, config.block_k * 2 // element_size))
    return config


def wins_over_cublas(n: int) -> bool:
    """Whether this kernel takes a layer of width n at 1..16 rows. Every width: it beat
    cuBLAS clearly on the narrow outputs (cuBLAS takes split-K plus a reduce kernel
    there) and LM heads, and by a few percent in between, where a whole batch-1 step also
    gains from keeping the decode chain's launches programmatic (4.287 vs 4.375 ms).
    `EPD_SKINNY_ALL=0` gives the widths in between back to cuBLAS (for A/B runs)."""
    return n <= 4096 or n >= 65536 or os.environ.get("EPD_SKINNY_ALL", "1") != "0"


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """x [M <= 16, K] @ weight[N, K]^T (+ bias) -> [M, N]."""
    rows, k = x.shape
    n = weight.shape[0]
    assert rows <= MAX_ROWS and x.stride(-1) == 1 and weight.stride(-1) == 1
    config = config or default_config(n, k, x.is_cuda, max(x.element_size(), weight.element_size()))
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    _skinny_matmul_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, out, rows, n, k,
        x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        BLOCK_M=MAX_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch(x))
    return out
