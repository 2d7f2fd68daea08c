"""The whole engine on the Triton path (attention backend and fused ops) against the
torch reference: under the interpreter on CPU (tiny model, float32), in bf16 on CUDA."""
from __future__ import annotations

import random

import pytest
import torch

from engine import Engine, SamplingParams
from tests.engine.kernel_cases import HAS_CUDA, HAS_TRITON, rel_err

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _run(model_path, options: dict, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:  # noqa: ANN001
    engine = Engine(model_path, page_size=4, num_pages=64, max_num_batched_tokens=24, **options)
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    logits = []
    while engine.has_unfinished_requests():
        engine.step()
        assert engine.last_logits is not None
        logits.append(engine.last_logits.float().cpu())
    return logits


def _check(model_path, options: dict, tolerance: float) -> None:  # noqa: ANN001
    rng = random.Random(0)
    # Chunked prefill (budget 24) mixes prefill chunks with decodes; one prompt is long
    # enough for split-K in the decode kernel.
    prompts = [[rng.randrange(400) for _ in range(n)] for n in (3, 11, 30)]
    reference = _run(model_path, {"device": options.get("device", "cpu")}, prompts, 4)
    got = _run(model_path, options, prompts, 4)
    assert len(got) == len(reference)
    for ours, ref in zip(got, reference):
        assert ours.shape == ref.shape and (ours.numel() == 0 or rel_err(ours, ref) <= tolerance)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test: runs where there is no CUDA")
def test_triton_path_matches_torch_under_interpreter(tiny_model_path) -> None:  # noqa: ANN001
    _check(tiny_model_path, {"attention_backend": "triton", "triton_kernels": True}, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_triton_path_matches_torch_on_gpu(tiny_model_path, graphs: bool) -> None:  # noqa: ANN001
    _check(tiny_model_path, {"device": "cuda", "attention_backend": "triton", "triton_kernels": True,
                             "cuda_graphs": graphs, "cuda_graph_batch_sizes": (1, 2, 4)}, 5e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_overlap_with_cuda_graphs_matches_synchronous(tiny_model_path) -> None:  # noqa: ANN001
    from engine import LLM
    rng = random.Random(1)
    prompts = [[rng.randrange(400) for _ in range(n)] for n in (2, 9, 31, 57, 80)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 3, 20, 7, 15)]
    options = {"device": "cuda", "attention_backend": "triton", "triton_kernels": True, "cuda_graphs": True,
               "cuda_graph_batch_sizes": (1, 2, 4, 8)}
    outputs = []
    for overlap in (False, True):
        llm = LLM(tiny_model_path, overlap_schedule=overlap, **options)
        outputs.append([r.outputs[0].token_ids for r in llm.generate(prompts, params)])
        llm.engine.check_page_invariants()
    assert outputs[0] == outputs[1]
