"""Builds a model from a Hugging Face-format directory or from its config alone.

HF checkpoints keep q/k/v and gate/up as separate tensors; the model stacks them, so
each HF tensor is copied into a slice of one parameter. Every slice of every parameter
must be filled exactly once, or loading fails naming what is missing.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import DUMMY_FORMATS, ModelConfig
from engine.errors import ConfigError
from engine.models import CausalLM, build_model
from engine.models.rope import inverse_frequencies

_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _shard_slices(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF sub-name -> (our sub-name, start row, end row) for stacked parameters."""
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    return {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
        "self_attn.k_proj": ("self_attn.qkv_proj", q, q + kv),
        "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, q + 2 * kv),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
        "mlp.up_proj": ("mlp.gate_up_proj", inter, 2 * inter),
    }


def language_model_name(hf_name: str) -> str | None:
    """The text model's tensor name in a LLaVA-format checkpoint (`language_model.model.X`,
    `language_model.lm_head.weight`, or `model.language_model.X` + `lm_head.weight`), the
    name itself for a text-only one; None for the vision tower and projector."""
    name = hf_name.removeprefix("model.")
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        return None
    if name.startswith("language_model."):
        return name.removeprefix("language_model.")
    return hf_name


def _target(name: str, slices: dict[str, tuple[str, int, int]]) -> tuple[str, int | None, int | None]:
    name = name.removeprefix("model.")
    match = re.match(r"(layers\.\d+\.)(self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.(weight|bias)$", name)
    if match:
        prefix, sub, kind = match.groups()
        ours, start, end = slices[sub]
        return f"{prefix}{ours}.{kind}", start, end
    return name, None, None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no .safetensors weights in model directory {path}")
    return files


def load_weights(model: CausalLM, path: Path,
                 shard: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Fill every parameter of `model` from the checkpoint at `path`. `shard` (a tensor-
    parallel rank's loader, engine.parallel.model) cuts each tensor, by its name, to the
    part the rank holds before it is copied."""
    params = dict(model.named_parameters())
    filled: dict[str, int] = {name: 0 for name in params}
    slices = _shard_slices(model.config)
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for hf_name in handle.keys():
                text_name = language_model_name(hf_name)
                if text_name is None or _IGNORED.match(text_name) or (
                        text_name == "lm_head.weight" and model.lm_head is None):
                    continue
                name, start, end = _target(text_name, slices)
                if name not in params:
                    raise ConfigError(f"unexpected tensor {hf_name!r} in {file.name}")
                tensor = handle.get_tensor(hf_name)
                if shard is not None:
                    tensor = shard(text_name, tensor)
                _copy(params[name], tensor, start, end, hf_name)
                filled[name] += params[name].numel() if start is None else (end - start) * (
                    params[name].numel() // params[name].shape[0])
    missing = [n for n, count in filled.items() if count != params[n].numel()]
    if missing:
        raise ConfigError(f"checkpoint {path} lacks weights for: {', '.join(missing[:8])}")


def _copy(param: torch.nn.Parameter, tensor: torch.Tensor, start: int | None, end: int | None,
          hf_name: str) -> None:
    target = param.data if start is None else param.data[start:end]
    if tuple(target.shape) != tuple(tensor.shape):
        raise ConfigError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                          f"model expects {tuple(target.shape)}")
    target.copy_(tensor.to(dtype=target.dtype))


def dummy_values(shape: torch.Size, generator: torch.Generator, device: torch.device, load_format: str) -> torch.Tensor:
    """One matrix's random draw: N(0, 0.02) for "dummy"; U(-0.001, 0.001) for
    "dummy-uniform" (the range vLLM's dummy loader draws from: so small that each token's
    embedding dominates the residual stream, the next token is mostly a function of the
    current one, and greedy text falls into loops)."""
    if load_format == "dummy-uniform":
        return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * 1e-3
    return torch.randn(shape, generator=generator, device=device) * 0.02


def init_dummy_weights(model: CausalLM, seed: int, load_format: str = "dummy") -> None:
    """Seeded random weights (dummy_values), unit norms. Drawn on the parameters' device
    (an 8B model's weights in seconds on a GPU); the same seed gives the same weights on
    the same kind of device."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        param.data.copy_(dummy_values(param.shape, generator, device, load_format).to(param.dtype))


def load_model(path: Path | None, config: ModelConfig, device: torch.device, load_format: str,
               seed: int = 0) -> CausalLM:
    with torch.device("meta"):
        model = build_model(config, "meta")
    model = model.to_empty(device=device)
    # Buffers come out of to_empty uninitialised: recompute the rotary frequencies.
    model.rotary.inv_freq = inverse_frequencies(config.rope, config.head_dim).to(device)
    if load_format in DUMMY_FORMATS:
        init_dummy_weights(model, seed, load_format)
    else:
        assert path is not None
        load_weights(model, path)
    return model.eval()
