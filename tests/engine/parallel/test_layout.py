"""How heads, KV heads, MLP rows and the vocabulary split across ranks; what cannot split
is a ConfigError naming the size and the dimension. No rank is started here."""
from __future__ import annotations

import pytest
import torch

from engine import Engine
from engine.config import ModelConfig, RopeConfig
from engine.errors import ConfigError
from engine.parallel.layout import TPLayout
from engine.parallel.model import shard_tensor


def _config(heads: int = 8, kv: int = 2, inter: int = 48, vocab: int = 50, head_dim: int = 4) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=vocab, hidden_size=16, intermediate_size=inter, num_layers=1,
                       num_heads=heads, num_kv_heads=kv, head_dim=head_dim, rms_norm_eps=1e-6,
                       max_position_embeddings=64, rope=RopeConfig(), tie_word_embeddings=False, qkv_bias=True,
                       qk_norm=False, eos_token_ids=(), bos_token_id=None)


def test_kv_heads_shard_when_at_least_the_ranks() -> None:
    layout = TPLayout.of(_config(heads=8, kv=4), 2)
    assert [layout.heads(r) for r in range(2)] == [range(0, 4), range(4, 8)]
    assert [layout.kv_heads(r) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert layout.kv_replicas == 1 and [layout.kv_owner(h) for h in range(4)] == [0, 0, 1, 1]


def test_fewer_kv_heads_than_ranks_are_replicated_where_their_queries_are() -> None:
    layout = TPLayout.of(_config(heads=8, kv=2), 4)
    group = 8 // 2
    for rank in range(4):
        (kv_head,) = layout.kv_heads(rank)
        assert all(q // group == kv_head for q in layout.heads(rank))  # its query heads use it
    assert [layout.kv_heads(r).start for r in range(4)] == [0, 0, 1, 1]
    assert [layout.kv_owner(h) for h in range(2)] == [0, 2]
    single = TPLayout.of(_config(heads=4, kv=1), 2)
    assert single.kv_heads(0) == single.kv_heads(1) == range(0, 1) and single.kv_replicas == 2


def test_vocab_shards_cover_the_vocabulary_once() -> None:
    layout = TPLayout.of(_config(vocab=50), 4)
    assert layout.vocab_per_rank == 13
    rows = [v for r in range(4) for v in layout.vocab(r)]
    assert rows == list(range(50)) and len(layout.vocab(3)) == 11


def test_local_config_has_the_rank_shapes() -> None:
    config = _config(heads=8, kv=2, inter=48)
    local = TPLayout.of(config, 4).local_model_config(config)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (2, 1, 12, 50)
    assert local.num_heads // local.num_kv_heads == 2  # each local query pair reads its one KV head


@pytest.mark.parametrize("size, message", [
    (3, r"must divide num_attention_heads \(8\)"),
    (0, "positive integer"),
])
def test_sizes_that_cannot_split_are_config_errors(size: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TPLayout.of(_config(), size)


def test_kv_heads_neither_divisible_nor_replicable() -> None:
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(6\) or be a multiple"):
        TPLayout.of(_config(heads=12, kv=6), 4)
    with pytest.raises(ConfigError, match=r"intermediate_size \(50\)"):
        TPLayout.of(_config(inter=50), 4)


def test_shards_reassemble_every_weight() -> None:
    """Cut pieces of each kind put back together give the whole (replicated KV heads once)."""
    config = _config(heads=8, kv=4, inter=48, head_dim=4)
    layout = TPLayout.of(config, 2)
    d, h, hidden = 4, 8, 16
    full = {"model.layers.0.self_attn.q_proj.weight": torch.randn(h * d, hidden),
            "model.layers.0.self_attn.k_proj.bias": torch.randn(4 * d),
            "model.layers.0.mlp.up_proj.weight": torch.randn(48, hidden),
            "model.layers.0.self_attn.o_proj.weight": torch.randn(hidden, h * d),
            "model.layers.0.mlp.down_proj.weight": torch.randn(hidden, 48)}
    for name, tensor in full.items():
        parts = [shard_tensor(name, tensor, config, layout, r) for r in range(2)]
        dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
        assert torch.equal(torch.cat(parts, dim), tensor), name
    head = torch.randn(50, hidden)
    parts = [shard_tensor("lm_head.weight", head, config, layout, r) for r in range(2)]
    assert all(p.shape == (25, hidden) for p in parts) and torch.equal(torch.cat(parts), head)
    norm = torch.randn(hidden)
    assert shard_tensor("model.norm.weight", norm, config, layout, 1) is norm


def test_stacked_qkv_cuts_like_its_parts() -> None:
    config = _config(heads=8, kv=2, head_dim=4)
    layout = TPLayout.of(config, 4)
    q, k, v = torch.randn(32, 16), torch.randn(8, 16), torch.randn(8, 16)
    stacked = torch.cat([q, k, v])
    for rank in range(4):
        expected = torch.cat([shard_tensor(f"self_attn.{n}_proj.weight", t, config, layout, rank)
                              for n, t in (("q", q), ("k", k), ("v", v))])
        assert torch.equal(shard_tensor("layers.0.self_attn.qkv_proj.weight", stacked, config, layout, rank), expected)
    assert shard_tensor("self_attn.k_proj.weight", k, config, layout, 1).shape == (4, 16)  # one replicated head


def test_engine_refuses_bad_sizes_before_starting_ranks(tiny_model_path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=r"must divide num_attention_heads \(4\)"):
        Engine(tiny_model_path, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="cuda_graphs or overlap_schedule"):
        Engine(tiny_model_path, tensor_parallel_size=2, overlap_schedule=True)
    if torch.cuda.device_count() < 4:  # the tiny model splits 4 ways; more GPUs than this host has
        with pytest.raises(ConfigError, match=r"needs CUDA devices 0\.\.3"):
            Engine(tiny_model_path, tensor_parallel_size=4, device="cuda")


def test_size_one_builds_nothing_parallel(tiny_model_path) -> None:  # noqa: ANN001
    """TP=1 (every default, bench.engine_bench) runs the plain classes: no ranks, no
    groups, no broadcast in the step, one KV region of every head."""
    from engine.model_runner import ModelRunner
    from engine.models.llama import CausalLM
    engine = Engine(tiny_model_path, num_pages=8)
    assert engine.tp is None
    assert type(engine.runner) is ModelRunner and type(engine.runner.model) is CausalLM
    (buffer,) = engine.kv_buffers()
    assert buffer is engine.kv_cache.buffer
    assert engine.kv_cache.buffer.shape[4] == engine.model_config.num_kv_heads
    engine.close()  # nothing to stop
