"""Attention backend interface.

A backend owns nothing but code: the KV cache tensor belongs to `KVCache`, the page
tables to the scheduler. Each call writes the step's new K/V into their slots, then
attends every new query over its sequence's pages.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

import torch

from engine.batch import Batch
from engine.errors import ConfigError
from engine.kv_cache import KVCache

if TYPE_CHECKING:
    from engine.models.ops import TorchOps


class AttentionBackend(ABC):
    name: str = ""

    def __init__(self, kv_cache: KVCache, scale: float) -> None:
        self.kv_cache = kv_cache
        self.scale = scale

    def prepare(self, batch: Batch) -> None:
        """Once per step, after the runner filled the batch: build whatever the backend
        needs for all layers (device page tables, offsets) into batch.attention_metadata."""

    @abstractmethod
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KV, D] for the batch's new tokens -> output [T, H, D]."""

    def rotate_and_attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor], batch: Batch, ops: TorchOps,
    ) -> torch.Tensor:
        """Rotary embedding on q and k, then `forward`. A backend may fuse the rotation
        with its K/V write (one launch instead of two per layer)."""
        q, k = ops.rotary(q, k, *cos_sin)
        return self.forward(layer, q, k, v, batch)


_REGISTRY: dict[str, type[AttentionBackend]] = {}


def register_attention_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _REGISTRY[cls.name] = cls
    return cls


def create_attention_backend(name: str) -> Callable[[KVCache, float], AttentionBackend]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown attention backend {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]
