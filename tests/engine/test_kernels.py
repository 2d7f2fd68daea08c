"""Triton kernels against the torch reference: on CPU under the interpreter at tiny sizes
(float32), on CUDA at Llama-3.1-8B sizes (bfloat16, rel err <= 2e-2, never NaN)."""
from __future__ import annotations

import pytest
import torch

from engine.attention.torch_backend import TorchAttention
from engine.models.ops import TORCH_OPS
from engine.models.rope import RotaryEmbedding
from tests.engine.kernel_cases import DEVICES, HAS_CUDA, HAS_TRITON, SIZES, model_config, paged_batch, random_cache, rel_err

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    torch.manual_seed(0)
    return request.param


def test_rms_norm_and_fused_add(device: str) -> None:
    from engine.kernels.rmsnorm import add_rms_norm, rms_norm
    s = SIZES[device]
    x = torch.randn(37, s.hidden, device=device, dtype=s.dtype)
    delta = torch.randn_like(x)
    weight = torch.rand(s.hidden, device=device, dtype=s.dtype) + 0.5
    assert rel_err(rms_norm(x, weight, 1e-5), TORCH_OPS.rms_norm(x, weight, 1e-5)) <= s.tolerance
    total, normed = add_rms_norm(x, delta, weight, 1e-5)
    ref_total, ref_normed = TORCH_OPS.add_rms_norm(x, delta, weight, 1e-5)
    assert rel_err(total, ref_total) <= s.tolerance
    assert rel_err(normed, ref_normed) <= s.tolerance


def test_rotary_in_place_on_strided_views(device: str) -> None:
    from engine.kernels.rotary import apply_rotary_
    s = SIZES[device]
    tokens, q_size, kv_size = 29, s.heads * s.head_dim, s.kv_heads * s.head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, device=device, dtype=s.dtype)
    q = qkv[:, :q_size].view(tokens, s.heads, s.head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(tokens, s.kv_heads, s.head_dim)
    rotary = RotaryEmbedding(model_config(s).rope, s.head_dim).to(device)
    cos, sin = rotary.cos_sin(torch.randint(0, 5000, (tokens,), device=device), s.dtype)
    ref_q, ref_k = TORCH_OPS.rotary(q.clone(), k.clone(), cos, sin)
    untouched = qkv[:, q_size + kv_size:].clone()
    apply_rotary_(q, k, cos, sin)
    assert rel_err(q, ref_q) <= s.tolerance and rel_err(k, ref_k) <= s.tolerance
    assert torch.equal(qkv[:, q_size + kv_size:], untouched)  # v is left alone


def test_silu_and_mul(device: str) -> None:
    from engine.kernels.activation import silu_and_mul
    s = SIZES[device]
    gate_up = torch.randn(23, 2 * s.intermediate, device=device, dtype=s.dtype)
    assert rel_err(silu_and_mul(gate_up), TORCH_OPS.silu_and_mul(gate_up)) <= s.tolerance


def test_kv_write_matches_cache_write(device: str) -> None:
    from engine.kernels.kv_write import write_kv
    s = SIZES[device]
    cache, ref = random_cache(s, 12, device), random_cache(s, 12, device)
    ref.buffer.copy_(cache.buffer)
    slots = torch.randperm(12 * s.page_size, device=device)[:9]
    k = torch.randn(9, s.kv_heads, s.head_dim, device=device, dtype=s.dtype)
    v = torch.randn_like(k)
    write_kv(k, v, *cache.layer_views(1), slots)
    ref.write(1, slots, k, v)
    assert torch.equal(cache.buffer, ref.buffer)
    padded = torch.full((9,), -1, dtype=torch.long, device=device)
    write_kv(k * 2, v * 2, *cache.layer_views(1), padded)  # padding rows store nothing
    assert torch.equal(cache.buffer, ref.buffer)


def test_rotary_fused_with_kv_write(device: str) -> None:
    # One launch = apply_rotary_ + write_kv: q and k rotated in place, rotated k and v in their slots.
    from engine.kernels.kv_write import write_kv
    from engine.kernels.rotary import apply_rotary_, rotary_and_write_kv
    s = SIZES[device]
    tokens, q_size, kv_size = 9, s.heads * s.head_dim, s.kv_heads * s.head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, device=device, dtype=s.dtype)
    views = lambda t: (t[:, :q_size].view(tokens, s.heads, s.head_dim),  # noqa: E731
                       t[:, q_size:q_size + kv_size].view(tokens, s.kv_heads, s.head_dim),
                       t[:, q_size + kv_size:].view(tokens, s.kv_heads, s.head_dim))
    ref_qkv = qkv.clone()
    rotary = RotaryEmbedding(model_config(s).rope, s.head_dim).to(device)
    cos, sin = rotary.cos_sin(torch.randint(0, 5000, (tokens,), device=device), s.dtype)
    cache, ref = random_cache(s, 12, device), random_cache(s, 12, device)
    ref.buffer.copy_(cache.buffer)
    before = cache.buffer.clone()
    slots = torch.randperm(12 * s.page_size, device=device)[:tokens]
    slots[3] = -1  # a padding row: rotated, not stored
    rotary_and_write_kv(*views(qkv), cos, sin, *cache.layer_views(1), slots)
    q, k, v = views(ref_qkv)
    apply_rotary_(q, k, cos, sin)
    write_kv(k, v, *ref.layer_views(1), slots)
    assert torch.equal(qkv, ref_qkv)
    assert torch.equal(cache.buffer, ref.buffer)
    assert not torch.equal(cache.buffer, before)  # something was stored


def _attention_case(device: str, seq_lens: list[int], query_lens: list[int], splits: int | None,
                    mixed: bool = False, fused_qkv: bool = False) -> None:
    from engine.attention.triton_backend import TritonAttention
    s = SIZES[device]
    num_pages = sum(-(-n // s.page_size) for n in seq_lens) + 5
    cache = random_cache(s, num_pages, device)
    ref_cache = random_cache(s, num_pages, device, dtype=torch.float32)
    ref_cache.buffer.copy_(cache.buffer.float())
    batch = paged_batch(seq_lens, query_lens, s.page_size, num_pages, device)
    tokens = sum(query_lens)
    if fused_qkv:  # strided views of one projection's output, as the model hands them over
        qkv = torch.randn(tokens, (s.heads + 2 * s.kv_heads) * s.head_dim, device=device, dtype=s.dtype)
        q, k, v = qkv.split([s.heads * s.head_dim] + [s.kv_heads * s.head_dim] * 2, dim=-1)
        q = q.view(tokens, s.heads, s.head_dim)
        k, v = (t.view(tokens, s.kv_heads, s.head_dim) for t in (k, v))
    else:
        q = torch.randn(tokens, s.heads, s.head_dim, device=device, dtype=s.dtype)
        k = torch.randn(tokens, s.kv_heads, s.head_dim, device=device, dtype=s.dtype)
        v = torch.randn_like(k)
    backend = TritonAttention(cache, s.head_dim**-0.5)
    backend.flash_prefill = False  # these cases test the Triton kernels (and SDPA); varlen has its own
    backend.prepare(batch)
    assert (batch.attention_metadata.split is not None) == mixed
    if splits is not None:
        batch.attention_metadata = batch.attention_metadata.__class__(
            **{**batch.attention_metadata.__dict__, "num_splits": splits})
    out = backend.forward(1, q, k, v, batch)
    # Again: split decode leaves its merge semaphores at zero for the next launch.
    assert torch.equal(backend.forward(1, q, k, v, batch), out)
    ref = TorchAttention(ref_cache, s.head_dim**-0.5).forward(1, q.float(), k.float(), v.float(), batch)
    assert rel_err(out, ref) <= s.tolerance
    assert rel_err(cache.buffer, ref_cache.buffer) <= s.tolerance  # the new K/V landed


@pytest.mark.parametrize("splits", [1, 3, None])
def test_decode_attention_paged_gqa_split(device: str, splits: int | None) -> None:
    s = SIZES[device]
    seq_lens = [1, 5, s.page_size, s.page_size + 1, s.long_context, 2 * s.page_size - 1]
    _attention_case(device, seq_lens, [1] * len(seq_lens), splits)


@pytest.mark.parametrize("k_transposed", [False, True])
def test_prefill_attention_ragged_with_paged_prefix(device: str, k_transposed: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.kernels import prefill_attention as kernel
    for name in ("GPU_CONFIG", "INTERPRETER_CONFIG"):
        monkeypatch.setattr(kernel, name, getattr(kernel, name)._replace(k_transposed=k_transposed))
    s = SIZES[device]
    long = s.long_context
    # fresh prompt, a decode row, a chunk after a prefix, a chunk ending mid-page
    _attention_case(device, [long // 2, long, long, 2 * s.page_size + 3],
                    [long // 2, 1, long // 3, s.page_size + 2], None)


def test_prefill_attention_verify_shaped_rows(device: str) -> None:
    """Speculation's verify steps: up to K + 1 new tokens per sequence after long
    contexts (the short-query tile on CUDA), fewer for some, one for one."""
    s = SIZES[device]
    long = s.long_context
    _attention_case(device, [long, 2 * s.page_size + 3, long // 2, s.page_size, 9],
                    [4, 2, 4, 1, 3], None)


def test_mixed_batch_splits_decode_rows_from_prefill_chunks(device: str) -> None:
    """Decode rows first (the scheduler's order), then chunks: the decode kernel takes the
    former, the prefill kernel the rest, each writing its rows of one output."""
    s = SIZES[device]
    long = s.long_context
    _attention_case(device, [5, long, s.page_size + 1, long, 2 * s.page_size + 3],
                    [1, 1, 1, long // 3, s.page_size + 2], None, mixed=True)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_skinny_matmul(device: str, rows: int) -> None:
    from engine.kernels.skinny_matmul import skinny_matmul
    s = SIZES[device]
    n, k = (s.intermediate, s.hidden) if device == "cuda" else (40, 72)  # n, k not block multiples on CPU
    x = torch.randn(rows, k, device=device, dtype=s.dtype)
    weight = torch.randn(n, k, device=device, dtype=s.dtype) * k**-0.5
    bias = torch.randn(n, device=device, dtype=s.dtype)
    assert rel_err(skinny_matmul(x, weight), TORCH_OPS.linear(x.float(), weight.float())) <= s.tolerance
    assert rel_err(skinny_matmul(x, weight, bias), TORCH_OPS.linear(x.float(), weight.float(), bias.float())) <= s.tolerance


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336), (6144, 4096), (28672, 4096)])
def test_skinny_matmul_float32_tiles_fit(n: int, k: int) -> None:
    """Float32 weights (e.g. a test model) take shorter k tiles than bf16's, which would
    not fit in shared memory."""
    from engine.kernels.skinny_matmul import skinny_matmul
    x = torch.randn(3, k, device="cuda")
    weight = torch.randn(n, k, device="cuda") * k**-0.5
    assert rel_err(skinny_matmul(x, weight), TORCH_OPS.linear(x.double(), weight.double())) <= 2e-2


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_whole_prompts_take_sdpa_and_match(device: str, fused_qkv: bool) -> None:
    s = SIZES[device]
    _attention_case(device, [s.long_context // 2, 7, s.page_size], [s.long_context // 2, 7, s.page_size], None,
                    fused_qkv=fused_qkv)


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_whole_prompts_of_one_length_take_one_sdpa_call(device: str, fused_qkv: bool) -> None:
    """Prompts of one length go through a single SDPA call on [B, heads, L, D] views."""
    s = SIZES[device]
    lengths = [s.page_size + 3] * 3
    _attention_case(device, lengths, lengths, None, fused_qkv=fused_qkv)


def test_rotary_table_gathers_exactly_what_cos_sin_computes(device: str) -> None:
    s = SIZES[device]
    rotary = RotaryEmbedding(model_config(s).rope, s.head_dim).to(device)
    positions = torch.randint(0, 3000, (57,), device=device)
    computed = rotary.cos_sin(positions, s.dtype)
    rotary.build_table(3000, s.dtype)
    gathered = rotary.cos_sin(positions, s.dtype)
    assert all(torch.equal(a, b) for a, b in zip(gathered, computed))
    other = torch.float16 if s.dtype != torch.float16 else torch.float32  # no table for it: computed
    fresh = RotaryEmbedding(model_config(s).rope, s.head_dim).to(device)
    assert all(torch.equal(a, b) for a, b in zip(rotary.cos_sin(positions, other), fresh.cos_sin(positions, other)))


def test_split_counts_are_the_few_that_warm_up_compiles() -> None:
    """Every split count the decode kernel can be asked for is one `warm_up` compiles at
    start (a count first met under load stalled a step for the compile)."""
    from engine.kernels.decode_attention import SPLIT_COUNTS, choose_num_splits
    seen = {choose_num_splits(seqs, kv_heads, seq_len, sms)
            for seqs in range(1, 300, 7) for kv_heads in (1, 2, 8) for seq_len in (1, 63, 64, 65, 1000, 4096, 131072)
            for sms in (4, 108, 132)}
    assert seen <= set(SPLIT_COUNTS) and {1, 16} <= seen
