"""Model definitions. `build_model(config)` returns the module for a ModelConfig."""
from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.models.llama import CausalLM


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> CausalLM:
    """Llama, Qwen2 and Qwen3 share one decoder; the config switches bias and q/k norm."""
    with torch.device(device):
        model = CausalLM(config)
    return model.to(dtype=config.torch_dtype)


__all__ = ["CausalLM", "build_model"]
