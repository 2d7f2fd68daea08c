"""Attention backends: a small base class plus a registry."""
from __future__ import annotations

from engine.attention.base import AttentionBackend, create_attention_backend, register_attention_backend
from engine.attention import torch_backend as _torch_backend  # noqa: F401  (registers "torch")
from engine.attention import triton_backend as _triton_backend  # noqa: F401  (registers "triton")

__all__ = ["AttentionBackend", "create_attention_backend", "register_attention_backend"]
