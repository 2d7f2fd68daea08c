"""`TorchOps` with the Triton kernels swapped in: the GPU path of the model's
elementwise work. Shapes a kernel does not cover fall back to the reference."""
from __future__ import annotations

import torch

from engine.kernels.activation import silu_and_mul
from engine.kernels.rmsnorm import add_rms_norm, rms_norm
from engine.kernels.rotary import apply_rotary_
from engine.kernels.skinny_matmul import MAX_ROWS, skinny_matmul, wins_over_cublas
from engine.models.ops import TorchOps


class TritonOps(TorchOps):
    name = "triton"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # A few rows only stream the weight; used where measured faster than cuBLAS.
        if x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.stride(-1) == 1 and (
                wins_over_cublas(weight.shape[0]) or not x.is_cuda):
            return skinny_matmul(x, weight, bias)
        return super().linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dim() != 2 or x.stride(-1) != 1:  # e.g. Qwen3's per-head q/k norm on strided views
            return super().rms_norm(x, weight, eps)
        return rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, delta, weight, eps)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary_(q, k, cos, sin)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)


TRITON_OPS = TritonOps()
