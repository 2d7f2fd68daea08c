"""Prefill attention through FlashAttention varlen (engine/attention/varlen.py).

Host-side metadata (offsets, gather rows) is checked on CPU. The backend's varlen path
runs on CPU too, with the flash call replaced by the reference's math (so the gather,
offsets, decode split and output placement are checked where CI runs), and on CUDA with
the real call, against a float32 reference: whole prompts, prefixes of page-unaligned
lengths, GQA and MHA, decode rows mixed in; plus the whole engine, greedy, against the
torch backend.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from engine.attention import varlen
from engine.attention.torch_backend import TorchAttention
from engine.attention.varlen import VarlenMetadata, cumulative, gather_rows, plan_varlen, worth_varlen
from tests.engine.kernel_cases import DEVICES, HAS_CUDA, HAS_TRITON, SIZES, paged_batch, random_cache, rel_err

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _flash_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path is opt-in (EPD_FLASH_PREFILL=1): these tests are about it."""
    monkeypatch.setenv("EPD_FLASH_PREFILL", "1")


# --- host-side metadata (CPU) ---

def test_cumulative_offsets() -> None:
    assert cumulative([3, 1, 5]).tolist() == [0, 3, 4, 9]
    assert cumulative([3]).dtype == np.int32


def test_gather_rows_follow_each_sequences_pages() -> None:
    page_size, rows_per_page = 4, 24  # e.g. 3 layers x (K, V) x 4 tokens between pages
    table = np.array([[5, 2, 0], [7, 1, 3]], dtype=np.int32)
    rows = gather_rows([6, 9], table, page_size, rows_per_page)
    expected = [5 * 24 + t for t in range(4)] + [2 * 24 + t for t in range(2)]
    expected += [7 * 24 + t for t in range(4)] + [1 * 24 + t for t in range(4)] + [3 * 24]
    assert rows.tolist() == expected and rows.dtype == np.int32


def test_plan_whole_prompts_needs_no_gather() -> None:
    table = np.zeros((2, 4), dtype=np.int32)
    plan = plan_varlen([5, 9], [5, 9], table, 4, 8, first_row=0)
    assert plan.gather_rows is None and plan.first_token == 0
    assert plan.cu_seq_q.tolist() == plan.cu_seq_k.tolist() == [0, 5, 14]
    assert (plan.max_q, plan.max_k) == (9, 9)


def test_plan_after_decode_rows_with_a_prefix() -> None:
    # Two decode rows, then a fresh prompt and a chunk of 3 over a 6-token prefix.
    table = np.array([[1, 0, 0], [2, 0, 0], [3, 4, 0], [5, 6, 8]], dtype=np.int32)
    plan = plan_varlen([1, 1, 5, 3], [4, 2, 5, 9], table, 4, 10, first_row=2)
    assert plan.first_token == 2
    assert plan.cu_seq_q.tolist() == [0, 5, 8] and plan.cu_seq_k.tolist() == [0, 5, 14]
    assert (plan.max_q, plan.max_k) == (5, 9)
    assert plan.gather_rows is not None
    assert plan.gather_rows.tolist() == gather_rows([5, 9], table[2:], 4, 10).tolist()


def test_few_queries_over_long_prefixes_stay_on_the_paged_kernel() -> None:
    assert worth_varlen([2048] * 4, [2048] * 4)
    assert worth_varlen([1024, 1024], [2048, 2048])
    assert not worth_varlen([4] * 16, [1024] * 16)  # speculative verification


def test_token_rows_view_matches_page_views() -> None:
    s = SIZES["cpu"]
    cache = random_cache(s, 9, "cpu", layers=3)
    slots = torch.tensor([0, 5, 17, 35, 8 * s.page_size + 3])
    pages, offsets = slots // s.page_size, slots % s.page_size
    rows = pages * cache.rows_per_page + offsets
    for layer in range(3):
        k_pages, v_pages = cache.layer_views(layer)
        k_rows, v_rows = cache.token_rows(layer)
        assert torch.equal(k_rows.index_select(0, rows), k_pages[pages, offsets])
        assert torch.equal(v_rows.index_select(0, rows), v_pages[pages, offsets])


# --- the backend's varlen path against the float32 reference ---

def _reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMetadata,
                      scale: float) -> torch.Tensor:
    """The flash call's contract in the reference backend's math (bottom-right causal)."""
    attend = TorchAttention.__new__(TorchAttention)
    attend.scale = scale
    out = torch.empty_like(q)
    cu_q, cu_k = meta.cu_seq_q.tolist(), meta.cu_seq_k.tolist()
    for i in range(len(cu_q) - 1):
        rows = slice(cu_q[i], cu_q[i + 1])
        out[rows] = attend._attend(q[rows], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]])
    return out


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    torch.manual_seed(0)
    # These cases check the path, not the choice: every prefill batch takes it.
    monkeypatch.setattr(varlen, "MIN_QUERIES_PER_GATHERED_KEY", 0)
    if request.param == "cpu":  # no flash on CPU: its contract in torch, the rest for real
        from engine.attention import triton_backend
        monkeypatch.setattr(triton_backend, "flash_varlen", _reference_varlen)
    return request.param


def _varlen_case(device: str, seq_lens: list[int], query_lens: list[int], mha: bool = False,
                 expect_gather: bool = True) -> None:
    from engine.attention.triton_backend import TritonAttention
    s = SIZES[device]
    if mha:
        s = dataclasses.replace(s, kv_heads=s.heads)
    num_pages = sum(-(-n // s.page_size) for n in seq_lens) + 5
    cache = random_cache(s, num_pages, device)
    ref_cache = random_cache(s, num_pages, device, dtype=torch.float32)
    ref_cache.buffer.copy_(cache.buffer.float())
    batch = paged_batch(seq_lens, query_lens, s.page_size, num_pages, device)
    q = torch.randn(sum(query_lens), s.heads, s.head_dim, device=device, dtype=s.dtype)
    k = torch.randn(sum(query_lens), s.kv_heads, s.head_dim, device=device, dtype=s.dtype)
    v = torch.randn_like(k)
    backend = TritonAttention(cache, s.head_dim**-0.5)
    if device == "cuda":
        assert backend.flash_prefill, "flash varlen unavailable on this GPU (see the log for why)"
    backend.flash_prefill = True
    backend.prepare(batch)
    meta = batch.attention_metadata
    assert meta.varlen is not None and (meta.varlen.gather_rows is not None) == expect_gather
    out = backend.forward(1, q, k, v, batch)
    ref = TorchAttention(ref_cache, s.head_dim**-0.5).forward(1, q.float(), k.float(), v.float(), batch)
    assert rel_err(out, ref) <= s.tolerance
    assert rel_err(cache.buffer, ref_cache.buffer) <= s.tolerance  # the new K/V landed


@needs_triton
@pytest.mark.parametrize("mha", [False, True])
def test_whole_prompts(device: str, mha: bool) -> None:
    s = SIZES[device]
    lengths = [s.long_context // 2, 7, s.page_size, s.page_size + 1]
    _varlen_case(device, lengths, lengths, mha=mha, expect_gather=False)


@needs_triton
@pytest.mark.parametrize("mha", [False, True])
def test_chunks_over_cached_prefixes_of_unaligned_lengths(device: str, mha: bool) -> None:
    s = SIZES[device]
    long, page = s.long_context, s.page_size
    # prefixes of 1, page - 1, page + 3 and long - long // 3 tokens; a fresh prompt beside them
    queries = [page + 5, 2 * page, 3, long // 3, long // 4]
    prefixes = [1, page - 1, page + 3, long - long // 3, 0]
    _varlen_case(device, [p + q for p, q in zip(prefixes, queries)], queries, mha=mha)


@needs_triton
def test_decode_rows_mixed_with_chunks(device: str) -> None:
    s = SIZES[device]
    long, page = s.long_context, s.page_size
    _varlen_case(device, [5, long, page + 1, long, 3 * page + 3, 2 * page],
                 [1, 1, 1, long // 3, page + 2, 2 * page])


@needs_triton
def test_decode_rows_mixed_with_whole_prompts(device: str) -> None:
    s = SIZES[device]
    _varlen_case(device, [9, s.long_context, 2 * s.page_size + 3, 40], [1, 1, 2 * s.page_size + 3, 40],
                 expect_gather=False)


# --- CUDA only: the choice, and the whole engine ---

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_flash_is_chosen_for_half_precision_only() -> None:
    device = torch.device("cuda")
    assert varlen.flash_unavailable(device, torch.bfloat16, 32, 8, 128) is None
    assert varlen.flash_unavailable(device, torch.float16, 4, 2, 16) is None
    assert varlen.flash_unavailable(device, torch.float32, 32, 8, 128) is not None


def _greedy_run(model_path, options: dict, waves: list[list[list[int]]]) -> tuple[list, list, int]:  # noqa: ANN001
    """Tokens of each request and each step's logits, run in waves (a wave starts after
    the one before finished, so its prompts hit the pages the earlier ones left in the
    prefix cache); and the prefix-cache hit tokens."""
    from engine import Engine, SamplingParams
    engine = Engine(model_path, page_size=4, num_pages=256, max_num_batched_tokens=48, **options)
    if options.get("attention_backend") == "triton":
        assert engine.runner.attention.flash_prefill
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    logits = []
    for wave in waves:
        for prompt in wave:
            tokens[engine.add_request(prompt, params)] = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens[output.request_id] += output.new_token_ids
            logits.append(engine.last_logits.float().cpu())
    return list(tokens.values()), logits, engine.scheduler.prefix_hit_tokens_total


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or not HAS_TRITON, reason="needs CUDA and triton")
def test_engine_greedy_matches_torch_backend_with_prefix_hits(tiny_model_path) -> None:  # noqa: ANN001
    rng = random.Random(3)
    shared = [rng.randrange(400) for _ in range(41)]
    waves = [[shared + [rng.randrange(400) for _ in range(5)]],
             [shared[:n] + [rng.randrange(400) for _ in range(m)] for n, m in ((41, 3), (30, 17), (13, 60))]
             + [[rng.randrange(400) for _ in range(25)]]]
    # float16 (flash takes no float32); the same Triton norm/rotary/activation kernels on
    # both sides, so that only attention differs.
    common = {"device": "cuda", "dtype": "float16", "triton_kernels": True}
    expected, ref_logits, _ = _greedy_run(tiny_model_path, common, waves)
    got, logits, hits = _greedy_run(tiny_model_path, {**common, "attention_backend": "triton"}, waves)
    assert hits > 0  # the second wave attended over cached prefix pages
    assert got == expected
    assert len(logits) == len(ref_logits)
    for ours, ref in zip(logits, ref_logits):
        assert ours.shape == ref.shape and (ours.numel() == 0 or rel_err(ours, ref) <= 2e-2)
