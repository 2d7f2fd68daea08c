"""Checkpoints for the speculation tests, written once per test session.

`loopy`: the tiny model with its attention outputs scaled down (o_proj x 0.3). Its
greedy output depends on the context but tends to revisit earlier tokens, so n-gram
lookup gets a real, partial acceptance (~20% on random prompts) rather than none.
`small_draft`: a 1-layer model with the tiny tokenizer (same vocabulary), different
weights: a draft whose proposals are mostly rejected.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from engine.tiny import create_tiny_model


def write_loopy(directory: Path, scale: float = 0.3) -> Path:
    create_tiny_model(directory)
    weights = load_file(str(directory / "model.safetensors"))
    for name in weights:
        if name.endswith("o_proj.weight"):
            weights[name] = weights[name] * scale
    save_file(weights, str(directory / "model.safetensors"))
    return directory


def write_small_draft(directory: Path, seed: int = 11) -> Path:
    create_tiny_model(directory, seed=seed)
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    weights = load_file(str(directory / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.") or k.startswith("model.layers.0.")},
              str(directory / "model.safetensors"))
    return directory
