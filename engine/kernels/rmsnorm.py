"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import wait_and_release


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, sum_ptr, out_ptr, weight_ptr,
                         stride_x, stride_delta, stride_sum, stride_out, width, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    wait_and_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0)
        # Rounded to the stream dtype first, as `x + delta` is in the reference.
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / width + eps)
    normed = (xf * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.dim() == 2 and x.stride(-1) == 1
    tokens, width = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if delta is not None else x
    block = triton.next_power_of_2(width)
    if tokens:
        _add_rms_norm_kernel[(tokens,)](
            x, delta if delta is not None else x, total, out, weight,
            x.stride(0), delta.stride(0) if delta is not None else 0, total.stride(0), out.stride(0),
            width, eps, HAS_DELTA=delta is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 256)), **pdl.launch(x))
    return total, out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, N] (rows contiguous) -> weight * normalize(x)."""
    return _launch(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) in one pass; x and delta [T, N]."""
    return _launch(x, delta, weight, eps)
