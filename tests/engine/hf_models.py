"""Random-weight checkpoints of each supported architecture, saved by transformers.

Weights are drawn with fan-in scaling (not transformers' N(0, 0.02)) so logits are well
separated and greedy decoding is a meaningful comparison; norms and biases are random
too so that a loader that skipped them would fail.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from engine.tiny import VOCAB_SIZE, create_tiny_model

COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
              rms_norm_eps=1e-6, bos_token_id=VOCAB_SIZE - 5, eos_token_id=VOCAB_SIZE - 1)


def _config(arch: str):  # noqa: ANN202 - a transformers config
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    if arch == "llama":
        return LlamaConfig(**COMMON, head_dim=16, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128}, rope_theta=50000.0)
    if arch == "qwen2":
        return Qwen2Config(**{**COMMON, "num_key_value_heads": 4}, tie_word_embeddings=False)
    if arch == "qwen3":
        # head_dim differs from hidden/heads (64/8 = 8) on purpose.
        return Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=True)
    raise ValueError(arch)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                gain = 4.0 if "lm_head" in name else 1.5
                param.copy_(gain * torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)


def save_hf_checkpoint(arch: str, directory: Path, seed: int = 0) -> Path:
    """Write a checkpoint with save_pretrained plus the tiny model's tokenizer files."""
    return save_hf_config(_config(arch), directory, seed, arch)


def save_hf_config(config, directory: Path, seed: int = 0, tag: str = "model") -> Path:  # noqa: ANN001
    """As save_hf_checkpoint, for any transformers config of a supported architecture."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model.save_pretrained(directory)
    tokenizer_source = create_tiny_model(directory.parent / f"_tok_{tag}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_source / name, directory / name)
    return directory


def load_hf(directory: Path):  # noqa: ANN201
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def _randomize_llava(model: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled random weights (transformers' init is too flat for greedy checks)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() == 1:
                base = 1.0 if name.endswith(("norm.weight", "layernorm.weight", "layrnorm.weight",
                                             "layer_norm1.weight", "layer_norm2.weight")) else 0.0
                param.copy_(base + 0.2 * torch.randn(param.shape, generator=gen))
            elif "embed_tokens" in name or "position_embedding" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                fan_in = param[0].numel()
                gain = 4.0 if "lm_head" in name else 2.0 if "projector" in name else 1.5
                param.copy_(gain * torch.randn(param.shape, generator=gen) / fan_in ** 0.5)


def save_hf_llava(vision: str, directory: Path, seed: int = 0) -> Path:
    """A LLaVA checkpoint (`vision`: clip or siglip tower) written by save_pretrained,
    with the tiny VLM's tokenizer and preprocessor config beside it."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from engine.tiny_vlm import create_tiny_vlm, vlm_config
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(**vlm_config(vision))).to(torch.float32)
    _randomize_llava(model, seed)
    model.save_pretrained(directory)
    extras = create_tiny_vlm(directory.parent / f"_extras_{vision}", vision)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(extras / name, directory / name)
    return directory
