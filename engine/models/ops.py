"""The elementwise operations the decoder layers call, as a swappable object.

`TorchOps` is the reference (the arithmetic the model always had); `engine.kernels.ops`
holds the Triton versions for the GPU path. A model gets its ops once, at build time or
through `CausalLM.use_ops`; the ops themselves hold no state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.models.rope import apply_rotary


class TorchOps:
    name = "torch"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, rms_norm(x + delta)): the residual add and the next norm."""
        x = x + delta
        return x, self.rms_norm(x, weight, eps)

    def streams_residual(self, x: torch.Tensor) -> bool:
        """Whether the model should run `DecoderLayer.forward_in_place` on the stream x
        (norms fused into the projections after them, residual adds into those before)."""
        return False

    def norm_linear(self, stream: torch.Tensor, ssq: torch.Tensor, norm: torch.nn.Module,
                    linear: torch.nn.Linear) -> torch.Tensor:
        """linear(norm(stream)), given ssq [T, P]: partial sums of squares of stream's rows."""
        x32 = stream.float()
        normed = (x32 * torch.rsqrt(ssq.sum(-1, keepdim=True) / stream.shape[-1] + norm.eps)).to(stream.dtype)
        return self.linear(norm.weight * normed, linear.weight, linear.bias)

    def linear_add_(self, stream: torch.Tensor, x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
        """stream += linear(x) in place; returns partial sums of squares of the new rows [T, P]."""
        stream.add_(self.linear(x, linear.weight, linear.bias))
        return stream.float().square().sum(-1, keepdim=True)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


TORCH_OPS = TorchOps()
