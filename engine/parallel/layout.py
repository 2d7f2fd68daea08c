"""How a model is split across the ranks of one tensor-parallel worker (torch-free).

Rank r of N holds:

- query heads [r·H/N, (r+1)·H/N) (column-parallel q of `qkv_proj`, row-parallel `o_proj`);
- KV heads: with KV ≥ N, heads [r·KV/N, (r+1)·KV/N); with KV < N (N a multiple of KV),
  the one head its query heads use, KV head r // (N/KV), replicated on N/KV ranks. Either
  way the local GQA group is the model's (each local query head reads a local KV head);
- intermediate rows [r·I/N, (r+1)·I/N) of `gate_up_proj` (gate and up alike), the same
  columns of `down_proj`;
- vocabulary rows [r·V', (r+1)·V') of the LM head, V' = ceil(V/N) (the last shard may
  be short; its logits are padded to V' before they are gathered on rank 0).

The embedding, norms and q/k norms are replicated. The KV cache of a rank holds only its
KV heads, under the same page ids on every rank (rank 0's scheduler owns them all). The
transfer layer uses the same rule to move pages between workers of different TP sizes
(`worker/kv_layout.py`), so this module is shared by the engine and the workers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.config import ModelConfig


@dataclass(frozen=True)
class TPLayout:
    size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @staticmethod
    def of(config: ModelConfig, size: int) -> TPLayout:
        """The layout of `config` over `size` ranks; ConfigError when it cannot be split."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"tensor_parallel_size must be a positive integer, got {size!r}")
        heads, kv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
        if heads % size:
            raise ConfigError(f"tensor_parallel_size {size} must divide num_attention_heads ({heads})")
        if kv % size and size % kv:
            raise ConfigError(f"tensor_parallel_size {size} must divide num_key_value_heads ({kv}) "
                              f"or be a multiple of it (then KV heads are replicated)")
        if inter % size:
            raise ConfigError(f"tensor_parallel_size {size} must divide intermediate_size ({inter})")
        return TPLayout(size, heads, kv, inter, config.vocab_size)

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.size

    @property
    def kv_heads_per_rank(self) -> int:
        return max(self.num_kv_heads // self.size, 1)

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold each KV head (1 unless KV < N)."""
        return max(self.size // self.num_kv_heads, 1)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab_size // self.size)

    def heads(self, rank: int) -> range:
        return _block(rank, self.heads_per_rank)

    def kv_heads(self, rank: int) -> range:
        """Global indices of the KV heads rank `rank` holds, in its cache order."""
        if self.num_kv_heads >= self.size:
            return _block(rank, self.kv_heads_per_rank)
        head = rank // self.kv_replicas
        return range(head, head + 1)

    def kv_owner(self, head: int) -> int:
        """The first rank holding KV head `head` (the one a transfer reads it from)."""
        if self.num_kv_heads >= self.size:
            return head // self.kv_heads_per_rank
        return head * self.kv_replicas

    def intermediate(self, rank: int) -> range:
        return _block(rank, self.intermediate_size // self.size)

    def vocab(self, rank: int) -> range:
        """The real vocabulary rows of rank `rank` (at most vocab_per_rank of them)."""
        start = min(rank * self.vocab_per_rank, self.vocab_size)
        return range(start, min(start + self.vocab_per_rank, self.vocab_size))

    def local_model_config(self, config: ModelConfig) -> ModelConfig:
        """The shapes one rank builds: its heads, KV heads and intermediate rows; the
        vocabulary stays whole (the embedding is replicated; the LM head is cut apart)."""
        return replace(config, num_heads=self.heads_per_rank, num_kv_heads=self.kv_heads_per_rank,
                       intermediate_size=self.intermediate_size // self.size)


def _block(rank: int, width: int) -> range:
    return range(rank * width, (rank + 1) * width)
