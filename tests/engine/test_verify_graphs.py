"""The graphs of verify steps (T > 1 tokens per row, engine/cuda_graph.py) on the CPU.

`EagerGraphs` is DecodeGraphs without CUDA: the same static buffer, host staging
(`GraphInputs`), copy and `can_run`, and a "replay" that runs the forward the graph
would have captured, on the static buffer, eagerly (Triton kernels under the
interpreter). So everything about a graph step but the capture itself is checked here:
ragged packing of requests with different draft counts, padding rows, the metadata the
prefill kernel reads, the logits gather, and the fallback decisions. The same checks
with real graphs run on CUDA in test_spec_gpu.py.
"""
from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from engine import Engine, SamplingParams
from engine.batch import Batch, ScheduledRequest
from engine.cuda_graph import DecodeGraphs, GraphInputs
from engine.model_runner import CarriedTokens, ModelRunner
from engine.request import Request
from tests.engine.kernel_cases import HAS_CUDA, HAS_TRITON


class _NoEvent:
    def synchronize(self) -> None: ...

    def record(self) -> None: ...


class EagerGraphs(DecodeGraphs):
    def __init__(self, runner: ModelRunner, engine: Engine, tokens_per_row: int) -> None:  # no capture
        config = engine.config
        assert config.max_model_len is not None
        self.model, self.attention = runner.model, runner.attention  # type: ignore[assignment]
        sizes = [b for b in (1, 2, 4, 8) if b <= config.max_num_seqs]
        self._init_buffers(config.page_size, sizes, config.max_model_len, config.max_num_seqs,
                           torch.device("cpu"), tokens_per_row)
        self.copied = [_NoEvent(), _NoEvent()]  # type: ignore[list-item]
        self.draft_counts: list[list[int]] = []  # per replay: each row's drafts

    @torch.inference_mode()
    def _replay(self, batch_size: int) -> torch.Tensor:
        return self._forward(self._static_batch(batch_size), batch_size)

    def run(self, batch: Batch, carried: CarriedTokens | None = None) -> torch.Tensor:
        self.draft_counts.append([item.num_draft_tokens for item in batch.scheduled])
        return super().run(batch, carried)


def _install(runner: ModelRunner, engine: Engine, verify_tokens: int) -> tuple[EagerGraphs, EagerGraphs]:
    runner.graphs = EagerGraphs(runner, engine, 1)
    runner.verify_graphs = EagerGraphs(runner, engine, verify_tokens)
    return runner.graphs, runner.verify_graphs


_MAX_TOKENS = (12, 8, 10, 16)  # different: requests near their limit draft fewer than K


def _run(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in _MAX_TOKENS]
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
    acct = engine.check_page_invariants()
    assert acct.free + acct.cached == acct.total
    return [outputs[i] for i in ids]


def _engine(model, overlap: bool = False, **options: Any) -> Engine:  # noqa: ANN001
    return Engine(model, attention_backend="triton", triton_kernels=False, page_size=4, num_pages=128,
                  max_num_seqs=4, overlap_schedule=overlap, **options)


@pytest.fixture(scope="module")
def echo_prompts(loopy_model_path) -> list[list[int]]:  # noqa: ANN001
    """Seed + the model's own greedy continuation + seed (bench/spec_bench.py's
    workload): n-gram lookup proposes the continuation again, part of it accepted."""
    rng = random.Random(5)
    seeds = [[rng.randrange(3, 400) for _ in range(n)] for n in (3, 12, 30, 20)]
    return [s + out + s for s, out in zip(seeds, _run(_engine(loopy_model_path), seeds))]


def _generate(model, prompts: list[list[int]], overlap: bool, **options: Any) -> tuple[list[list[int]], Engine, list]:  # noqa: ANN001, E501
    engine = _engine(model, overlap, **options)
    installed = list(_install(engine.runner, engine, 1 + engine.config.num_speculative_tokens))
    drafter = engine.speculation.drafter if engine.speculation is not None else None
    if drafter is not None and hasattr(drafter, "runner"):
        installed += _install(drafter.runner, engine, 2)
    return _run(engine, prompts), engine, installed


pytestmark = pytest.mark.skipif(HAS_CUDA or not HAS_TRITON, reason="interpreter test: runs where there is no CUDA")


@pytest.mark.parametrize("overlap", [False, True])
def test_ngram_verify_steps_run_in_graphs_and_match(loopy_model_path, echo_prompts, overlap: bool) -> None:  # noqa: ANN001, E501
    expected = _run(_engine(loopy_model_path), echo_prompts)
    got, engine, (decode, verify) = _generate(loopy_model_path, echo_prompts, overlap, speculative="ngram",
                                              num_speculative_tokens=3)
    assert got == expected
    assert verify.replays > 0 and engine.speculation.stats.accepted_tokens_total > 0
    # Requests with different numbers of drafts (none included) shared a verify replay.
    assert any(len(set(counts)) > 1 for counts in verify.draft_counts)
    assert any(0 in counts for counts in verify.draft_counts)


def test_draft_model_rounds_run_in_graphs_and_match(loopy_model_path, echo_prompts) -> None:  # noqa: ANN001
    expected = _run(_engine(loopy_model_path), echo_prompts)
    got, engine, (decode, verify, draft_decode, draft_catch_up) = _generate(
        loopy_model_path, echo_prompts, overlap=True, speculative="draft", num_speculative_tokens=3,
        speculative_draft_model=str(loopy_model_path))
    assert got == expected
    assert verify.replays > 0 and draft_decode.replays > 0 and draft_catch_up.replays > 0
    # The draft is the target itself: every draft is accepted unless a limit cuts it.
    assert engine.speculation.stats.accepted_tokens_total > 0
    drafter = engine.speculation.drafter
    assert drafter.free_pages() == drafter.total_pages()


def _decoding_request(pages: list[int], computed: int, drafts: list[int]) -> Request:
    request = Request("r", list(range(1, computed + 1)), SamplingParams(), output_token_ids=[5])
    request.pages, request.num_computed_tokens, request.draft_token_ids = pages, computed, drafts
    return request


def test_ragged_inputs_pack_rows_and_pad() -> None:
    inputs = GraphInputs(max_batch=4, max_pages=4, page_size=4, pin_memory=False, tokens_per_row=4)
    a = _decoding_request([3, 7, 8], 5, [40, 41, 42])  # last token at position 5, 3 drafts
    b = _decoding_request([9], 1, [])  # no drafts: one row, its last token
    batch = Batch([ScheduledRequest(a, 4, True, 3), ScheduledRequest(b, 1, True, 0)])
    filled = inputs.fill(0, batch, None)
    arrays = inputs.arrays[0]
    assert filled.logits_rows == 5 and filled.carried_rows == 0
    assert arrays["input_ids"][:5].tolist() == [5, 40, 41, 42, 5]
    assert arrays["positions"][:5].tolist() == [5, 6, 7, 8, 1]
    # Position p of `a` lives in page pages[p // 4] at offset p % 4.
    assert arrays["slots"][:4].tolist() == [7 * 4 + 1, 7 * 4 + 2, 7 * 4 + 3, 8 * 4]
    assert arrays["page_table"][0, :3].tolist() == [3, 7, 8] and arrays["page_table"][1, 0] == 9
    assert arrays["slots"][4] == 9 * 4 + 1 and (arrays["slots"][5:] == -1).all()
    assert arrays["seq_lens"].tolist() == [9, 2, 0, 0]
    assert arrays["query_start"].tolist() == [0, 4, 5, 5, 5]
    assert arrays["logits_rows"][:5].tolist() == [0, 1, 2, 3, 4] and (arrays["logits_rows"][5:] == 0).all()


def test_can_run_decisions() -> None:
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs._init_buffers(4, [1, 2, 4], 32, 4, torch.device("cpu"), 4)
    a = _decoding_request([3, 7, 8], 5, [40, 41, 42])
    verify = ScheduledRequest(a, 4, True, 3)
    assert graphs.can_run(Batch([verify]))
    assert not graphs.can_run(Batch([ScheduledRequest(a, 5, True, 3)]))  # more than T tokens
    assert not graphs.can_run(Batch([ScheduledRequest(a, 3, False, 0)]))  # a prompt chunk that samples nothing
    assert not graphs.can_run(Batch([verify] * 5))  # more rows than the largest graph
    assert not graphs.can_run(Batch([verify]), CarriedTokens({a: 0}, torch.zeros(1, dtype=torch.long)))
    assert graphs.can_run(Batch([verify]), CarriedTokens({}, torch.zeros(1, dtype=torch.long)))
    long = _decoding_request(list(range(8)), 30, [1, 2])
    assert not graphs.can_run(Batch([ScheduledRequest(long, 3, True, 2)]))  # past the context (32)
    decode = DecodeGraphs.__new__(DecodeGraphs)
    decode._init_buffers(4, [1, 2, 4], 32, 4, torch.device("cpu"), 1)
    assert not decode.can_run(Batch([verify])) and decode.can_run(Batch([ScheduledRequest(a, 1, True, 0)]))
