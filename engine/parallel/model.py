"""One rank's shard of the decoder (engine.parallel.layout says which part), and how its
weights are cut from a checkpoint or drawn as dummy weights.

`ParallelCausalLM` is `CausalLM` built with the rank's shapes, where `o_proj` and
`down_proj` all-reduce their partial sums (row-parallel) and the LM head covers the
rank's vocabulary rows, gathered on rank 0. Parameter names are CausalLM's, so the
loader fills them unchanged; only the tensors it copies are cut first (`shard_tensor`).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.config import DUMMY_FORMATS, ModelConfig
from engine.loader import dummy_values, load_weights
from engine.models.llama import CausalLM, Linear
from engine.models.rope import inverse_frequencies
from engine.parallel.comm import TPGroup
from engine.parallel.layout import TPLayout


class RowParallelLinear(Linear):
    """A linear layer over this rank's slice of its input features; the all-reduce sums
    the slices, so every rank ends with the full output."""

    def __init__(self, in_features: int, out_features: int, group: TPGroup) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ops.linear(x, self.weight, self.bias)
        self.group.all_reduce(out)
        return out


class ParallelCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, layout: TPLayout, group: TPGroup) -> None:
        super().__init__(layout.local_model_config(config))  # self.config: the rank's shapes
        self.layout, self.group = layout, group
        self.vocab = layout.vocab(group.rank)
        hidden = config.hidden_size
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.o_proj = RowParallelLinear(attn.q_size, hidden, group)
            mlp.down_proj = RowParallelLinear(mlp.down_proj.in_features, hidden, group)
        if self.lm_head is not None:  # untied: this rank's rows, padded to vocab_per_rank
            self.lm_head = Linear(hidden, layout.vocab_per_rank, bias=False)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rank 0: logits [rows, vocab]; other ranks take part in the gather and get an
        empty tensor. A step whose every rank knows it has no rows skips the gather."""
        vocab = self.layout.vocab_size
        if hidden.shape[0] == 0:
            return hidden.new_empty(0, vocab)
        weight = (self.embed_tokens.weight[self.vocab.start:self.vocab.stop] if self.lm_head is None
                  else self.lm_head.weight)
        local = self.ops.linear(hidden, weight)  # [rows, this rank's vocabulary]
        if local.shape[1] < self.layout.vocab_per_rank:  # a short last shard of a tied head
            local = F.pad(local, (0, self.layout.vocab_per_rank - local.shape[1]))
        parts = self.group.gather_to_first(local)
        if parts is None:
            return hidden.new_empty(0, vocab)
        logits = torch.cat(parts, dim=-1)
        return logits if logits.shape[1] == vocab else logits[:, :vocab].contiguous()


# -- cutting weights ---------------------------------------------------------------------

_ROWS = re.compile(r"(?:self_attn\.(?P<attn>[qkv])_proj|mlp\.(?P<mlp>gate|up)_proj)\.(?:weight|bias)$")
_STACKED = re.compile(r"(?:self_attn\.qkv_proj|mlp\.gate_up_proj)\.(?:weight|bias)$")


def shard_tensor(name: str, tensor: torch.Tensor, config: ModelConfig, layout: TPLayout,
                 rank: int) -> torch.Tensor:
    """The part of full tensor `name` (a checkpoint's or CausalLM's name) that rank
    `rank` holds; replicated tensors come back whole."""
    d = config.head_dim
    if _STACKED.search(name):  # our stacked q|k|v or gate|up of the whole model
        kinds = ("q_proj", "k_proj", "v_proj") if "qkv" in name else ("gate_proj", "up_proj")
        sizes = ([config.num_heads * d, config.num_kv_heads * d, config.num_kv_heads * d] if "qkv" in name
                 else [config.intermediate_size] * 2)
        prefix = "self_attn." if "qkv" in name else "mlp."
        suffix = name.rsplit(".", 1)[1]
        return torch.cat([shard_tensor(f"{prefix}{kind}.{suffix}", part, config, layout, rank)
                          for kind, part in zip(kinds, tensor.split(sizes))])
    match = _ROWS.search(name)
    if match is not None:
        kind = match["attn"] or match["mlp"]
        span = (_heads(layout.heads(rank), d) if kind == "q" else _heads(layout.kv_heads(rank), d)
                if kind in ("k", "v") else layout.intermediate(rank))
        return tensor[span.start:span.stop]
    if name.endswith("self_attn.o_proj.weight"):
        span = _heads(layout.heads(rank), d)
        return tensor[:, span.start:span.stop]
    if name.endswith("mlp.down_proj.weight"):
        span = layout.intermediate(rank)
        return tensor[:, span.start:span.stop]
    if name.endswith("lm_head.weight"):
        rows = layout.vocab(rank)
        return F.pad(tensor[rows.start:rows.stop], (0, 0, 0, layout.vocab_per_rank - len(rows)))
    return tensor


def _heads(heads: range, head_dim: int) -> range:
    return range(heads.start * head_dim, heads.stop * head_dim)


def init_dummy_shard(model: ParallelCausalLM, config: ModelConfig, seed: int, load_format: str = "dummy") -> None:
    """The dummy weights of engine.loader.init_dummy_weights (the same generator, the
    same draws in the same order over the whole model), each cut to this rank: a TP
    engine with dummy weights computes what a TP=1 one does."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        full = dict(CausalLM(config).named_parameters())
    params = dict(model.named_parameters())
    for name in sorted(full):
        if name.endswith("norm.weight"):
            params[name].data.fill_(1.0)
            continue
        values = dummy_values(full[name].shape, generator, device, load_format)
        params[name].data.copy_(shard_tensor(name, values, config, model.layout, model.group.rank).to(params[name].dtype))


def load_shard(path: Path | None, config: ModelConfig, layout: TPLayout, group: TPGroup,
               device: torch.device, load_format: str, seed: int = 0) -> ParallelCausalLM:
    """This rank's shard of the model on `device` (engine.loader.load_model, cut)."""
    with torch.device("meta"):
        model = ParallelCausalLM(config, layout, group).to(dtype=config.torch_dtype)
    model = model.to_empty(device=device)
    model.rotary.inv_freq = inverse_frequencies(config.rope, config.head_dim).to(device)
    if load_format in DUMMY_FORMATS:
        init_dummy_shard(model, config, seed, load_format)
    else:
        assert path is not None
        load_weights(model, path, shard=lambda name, tensor: shard_tensor(name, tensor, config, layout, group.rank))
    return model.eval()
