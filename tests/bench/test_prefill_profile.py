"""bench/prefill_profile.py's parsing of profiler output, on the CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bench import prefill_profile


def test_kernel_categories() -> None:
    names = {
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, cutlass::bfloat16_t>>":
            "attention",
        "nvjet_sm90_tst_256x128_64x4_2x1_v_bz_coopA_NTT": "matmul",
        "_add_rms_norm_kernel": "norm", "_silu_and_mul_kernel": "activation",
        "_rotary_kv_write_kernel": "rotary + KV write", "_prefill_kernel": "attention",
        "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long>": "index / copy",
    }
    assert {name: prefill_profile.category(name) for name in names} == names


def test_matmul_shapes_from_linear_layers() -> None:
    x, weight, bias = torch.randn(6, 5), torch.randn(3, 5), torch.randn(3)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        F.linear(x, weight)
        F.linear(x, weight)
        F.linear(x, weight, bias)
    shapes = {shape: calls for shape, calls, _ in prefill_profile.matmul_shapes(prof)}
    assert shapes == {(6, 5, 3): 3}
