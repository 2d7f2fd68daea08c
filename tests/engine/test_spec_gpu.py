"""Speculation on the GPU path (issue 17, acceptance 0): Triton attention and kernels,
CUDA graphs and the overlap scheduler on; greedy output equals the same configuration
without speculation. Verify steps run eagerly (graphs serve the decode steps without
drafts); see docs/architecture.md."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.test_spec_decode import _prompts

HAS_CUDA = torch.cuda.is_available()
GPU = {"device": "cuda", "attention_backend": "triton", "triton_kernels": True, "cuda_graphs": True,
       "cuda_graph_batch_sizes": (1, 2, 4, 8), "overlap_schedule": True}


def _greedy(model, **options) -> tuple[list[list[int]], LLM]:  # noqa: ANN001
    llm = LLM(model, **GPU, **options)
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True) for _ in _prompts()]
    outs = [r.outputs[0].token_ids for r in llm.generate(_prompts(), params)]
    acct = llm.engine.check_page_invariants()
    assert acct.free + acct.cached == acct.total
    return outs, llm


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculation_with_graphs_and_overlap_matches(loopy_model_path, method: str) -> None:  # noqa: ANN001
    expected, _ = _greedy(loopy_model_path)
    options = {"speculative": method, "num_speculative_tokens": 3}
    if method == "draft":
        options["speculative_draft_model"] = str(loopy_model_path)
    got, llm = _greedy(loopy_model_path, **options)
    assert got == expected
    stats = llm.engine.speculation.stats
    assert stats.accepted_tokens_total > 0
    drafter = llm.engine.speculation.drafter
    if drafter.total_pages() is not None:
        assert drafter.free_pages() == drafter.total_pages()
