"""Decoder-only transformer of the Llama family (Llama 2/3.x, Mistral, Qwen2, Qwen3).

Tokens of all requests in a step are flattened into one ragged dimension T; attention
is the only place that knows about sequences (through the batch's page tables).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.config import ModelConfig
from engine.models.ops import TORCH_OPS, TorchOps
from engine.models.rope import RotaryEmbedding

if TYPE_CHECKING:
    from engine.attention.base import AttentionBackend
    from engine.batch import Batch


class Linear(nn.Linear):
    """nn.Linear whose matmul goes through the model's ops (skinny GEMMs on the GPU path)."""

    ops: TorchOps = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops: TorchOps = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)); with no delta, (x, norm(x))."""
        if delta is None:
            return x, self(x)
        return self.ops.add_rms_norm(x, delta, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v projections stacked into one matmul; the loader fills the slices.
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.ops: TorchOps = TORCH_OPS

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
        batch: Batch, attention: AttentionBackend,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(tokens, self.num_kv_heads, self.head_dim)  # [T, KV, D]
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention.rotate_and_attend(self.layer_index, q, k, v, cos_sin, batch, self.ops)  # [T, H, D]
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.ops: TorchOps = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
        batch: Batch, attention: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x is the residual stream; delta the previous layer's MLP output, not yet added
        (so that the add fuses with this layer's first norm). Returns the new (x, delta)."""
        x, h = self.input_layernorm.add_and_norm(x, delta)
        x, h = self.post_attention_layernorm.add_and_norm(x, self.self_attn(h, cos_sin, batch, attention))
        return x, self.mlp(h)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.ops: TorchOps = TORCH_OPS

    def forward(self, batch: Batch, attention: AttentionBackend, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [T, hidden] of every token of the batch, or of `rows` only
        [len(rows), hidden] (the final norm then skips the others: a prefill's logits
        need its last rows only)."""
        x = self.embed_tokens(batch.input_ids)
        if batch.image_rows is not None:  # image positions take the image's embeddings
            x[batch.image_rows] = batch.image_embeds.to(x.dtype)
        cos_sin = self.rotary.cos_sin(batch.positions, x.dtype)
        delta: torch.Tensor | None = None
        for layer in self.layers:
            x, delta = layer(x, delta, cos_sin, batch, attention)
        if rows is not None:
            x, delta = x[rows], None if delta is None else delta[rows]
        return self.norm.add_and_norm(x, delta)[1]

    def use_ops(self, ops: TorchOps) -> None:
        """Route every norm, rotary and activation through `ops` (e.g. Triton kernels)."""
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.ops.linear(hidden, weight)
