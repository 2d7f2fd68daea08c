"""Model architectures for benchmarks: a config.json of a real model and nothing else.

`write_model_dir` writes the config with the tiny model's tokenizer beside it, so an
Engine can open the directory with `load_format="dummy"` (random weights, no download).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from engine.model_path import default_model_path

_LLAMA_31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192},
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "dtype": "bfloat16",
}

PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": _LLAMA_31_8B,
    "llama-3.2-1b": {**_LLAMA_31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
                     "rope_scaling": {**_LLAMA_31_8B["rope_scaling"], "factor": 32.0}},
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_theta": 1000000.0, "hidden_act": "silu", "attention_bias": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16",
    },
}


def write_model_dir(preset: str, directory: Path) -> Path:
    """config.json of the preset plus the tiny tokenizer (token ids are all a benchmark needs)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(PRESETS[preset], indent=2) + "\n")
    tiny = default_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, directory / name)
    return directory
