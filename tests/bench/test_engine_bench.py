"""bench/engine_bench.py's prefill-attention helpers on the CPU: the tiny model on the
Triton backend under the interpreter, the flash call replaced by the reference math (no
flash on CPU), so the benchmark times the path the engine takes."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from bench import engine_bench
from engine import Engine
from tests.engine.test_varlen_attention import _reference_varlen

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="interpreter test: needs triton, runs where there is no CUDA")


def test_attention_flops_count_prefix_keys() -> None:
    # 2 fresh queries see 1 + 2 keys; 2 queries after a 3-token prefix see 4 + 5.
    assert engine_bench.attention_flops([2, 2], [2, 5], heads=1, head_dim=1) == 4 * (3 + 9)


def test_engine_attention_times_the_engines_path(tiny_model_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from engine.attention import triton_backend, varlen
    monkeypatch.setattr(triton_backend, "flash_varlen", _reference_varlen)
    monkeypatch.setattr(varlen, "MIN_QUERIES_PER_GATHERED_KEY", 0)
    engine = Engine(tiny_model_path, attention_backend="triton", triton_kernels=True, page_size=4, num_pages=64,
                    enable_prefix_cache=False)
    engine.runner.attention.flash_prefill = True  # as on a GPU where flash serves the cache
    fresh = engine_bench.make_requests(engine, [9, 9], [0, 0], seed=0)
    chunks = engine_bench.make_requests(engine, [12, 12], [6, 6], seed=1)
    expected = {(True, 0): "flash varlen", (False, 0): "SDPA, one call",
                (True, 1): "flash varlen + gather", (False, 1): "triton paged kernel"}
    for (flash, which), path in expected.items():
        fn, name = engine_bench.engine_attention(engine, (fresh, chunks)[which], flash)
        assert name == path
        heads, dim = engine.model_config.num_heads, engine.model_config.head_dim
        assert fn().shape == (18 if which == 0 else 12, heads, dim)
    assert engine.runner.attention.flash_prefill  # the engine's own choice is restored
