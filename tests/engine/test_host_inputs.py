"""The runner's incremental host state builds exactly what a from-scratch build would:
`PageRows` (per-request page-id copies grown in place), `ModelRunner.prepare` (vectorized
positions and slots), and the decode graphs' staging buffers (`GraphInputs`, page-table
rows written incrementally), through page growth, preemption, aborts and prefix hits,
with and without overlap scheduling."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

from engine import Engine, SamplingParams
from engine.batch import Batch
from engine.cuda_graph import GraphInputs
from engine.model_runner import CarriedTokens, PageRows
from engine.request import Request, RequestStatus


def _reference_inputs(batch: Batch, page_size: int, carried: CarriedTokens | None) -> dict[str, Any]:
    """What the runner's inputs are, built from scratch over whole token and page lists."""
    ids, positions, slots, logits_indices, tables = [], [], [], [], []
    for item in batch.scheduled:
        request, start = item.request, item.request.num_computed_tokens
        end = start + item.num_new_tokens
        ids.extend(request.all_token_ids[start:end])
        if carried is not None and request in carried.source_rows:
            ids[-1] = int(carried.tokens[carried.source_rows[request]])
        positions.extend(range(start, end))
        slots.extend(request.pages[p // page_size] * page_size + p % page_size for p in range(start, end))
        tables.append(request.pages[: -(-end // page_size)])
        if item.completes_prompt:
            logits_indices.append(len(ids) - 1)
    return {"ids": ids, "positions": positions, "slots": slots, "logits": logits_indices, "tables": tables}


def _check_graph_inputs(inputs: GraphInputs, turn: int, batch: Batch, carried: CarriedTokens | None) -> None:
    fills = inputs.fill(turn, batch, carried).carried_rows
    arrays, rows, page_size = inputs.arrays[turn], len(batch.scheduled), inputs.page_size
    sources = carried.source_rows if carried is not None else {}
    assert fills == sum(item.request in sources for item in batch.scheduled)
    for row, item in enumerate(batch.scheduled):
        request, position = item.request, item.request.num_computed_tokens
        carried_row = request in sources
        assert arrays["fill_mask"][row] == carried_row
        if carried_row:
            assert arrays["fill_sources"][row] == sources[request]
        else:
            assert arrays["input_ids"][row] == request.all_token_ids[position]
        assert arrays["positions"][row] == position and arrays["seq_lens"][row] == position + 1
        assert arrays["slots"][row] == request.pages[position // page_size] * page_size + position % page_size
        count = position // page_size + 1
        assert arrays["page_table"][row, :count].tolist() == request.pages[:count]
    assert (arrays["slots"][rows:] == -1).all() and (arrays["seq_lens"][rows:] == 0).all()
    assert (arrays["fill_mask"][rows:] == 0).all()


class _Checker:
    """Wraps the runner: every batch's inputs are checked against the reference, and every
    decode batch is also staged into CPU graph inputs and checked there."""

    def __init__(self, engine: Engine, max_batch: int) -> None:
        self.engine, self.runner = engine, engine.runner
        max_pages = -(-engine.max_model_len // engine.config.page_size)
        self.inputs = GraphInputs(max_batch, max_pages, engine.config.page_size, pin_memory=False)
        self.turn, self.prepared, self.staged = 0, 0, 0
        self._execute, self._prepare = self.runner.execute, self.runner.prepare
        self.runner.execute, self.runner.prepare = self.execute, self.prepare  # type: ignore[method-assign]

    def prepare(self, batch: Batch, carried: CarriedTokens | None = None) -> None:
        expected = _reference_inputs(batch, self.engine.config.page_size, carried)
        self._prepare(batch, carried)
        assert batch.input_ids.tolist() == expected["ids"]
        assert batch.positions.tolist() == expected["positions"]
        assert batch.slot_mapping.tolist() == expected["slots"]
        assert batch.logits_indices.tolist() == expected["logits"]
        assert [t.tolist() for t in batch.page_tables] == expected["tables"]
        assert all(t.dtype == torch.long for t in (batch.input_ids, batch.positions, batch.slot_mapping))
        self.prepared += 1

    def execute(self, batch: Batch, carried: CarriedTokens | None = None) -> torch.Tensor:
        if 0 < len(batch.scheduled) <= self.inputs.max_batch and all(
                item.num_new_tokens == 1 and item.completes_prompt for item in batch.scheduled):
            _check_graph_inputs(self.inputs, self.turn, batch, carried)
            self.turn ^= 1
            self.staged += 1
        return self._execute(batch, carried)


@pytest.mark.parametrize("overlap", [False, True])
def test_incremental_inputs_equal_from_scratch(tiny_model_path, overlap: bool) -> None:  # noqa: ANN001
    # Few pages (preemption), page size 4 (a new page every 4 tokens), shared prefixes
    # (prefix hits), and aborts while requests run.
    engine = Engine(tiny_model_path, num_pages=48, page_size=4, max_num_seqs=6, max_num_batched_tokens=48,
                    overlap_schedule=overlap)
    checker = _Checker(engine, max_batch=8)
    rng = random.Random(7)
    base = [rng.randrange(400) for _ in range(24)]
    ids = []
    for i in range(14):
        prompt = base[: rng.randrange(4, 24)] + [rng.randrange(400) for _ in range(rng.randrange(1, 20))]
        ids.append(engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=rng.randrange(4, 40),
                                                             ignore_eos=True)))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps in (6, 15, 27):
            engine.abort_request(ids[steps % len(ids)])
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.prefix_hit_tokens_total > 0
    assert checker.prepared > 20 and checker.staged > 10
    engine.free_cache()
    assert engine.page_accounting().free == engine.config.num_pages


def _request(pages: list[int]) -> Request:
    request = Request("r", [1, 2, 3], SamplingParams())
    request.pages = pages
    return request


def test_page_rows_grow_in_place_and_follow_replaced_lists() -> None:
    rows = PageRows()
    request = _request([5, 6])
    assert rows.get(request, 2).tolist() == [5, 6]
    request.pages.extend(range(100, 140))  # past the first copy's capacity
    assert rows.get(request, 42).tolist() == [5, 6, *range(100, 140)]
    assert rows.get(request, 3).tolist() == [5, 6, 100]
    request.pages = [9]  # released and re-matched: a new list, copied afresh
    assert rows.get(request, 1).tolist() == [9]
    other = _request([1, 2, 3])
    assert rows.get(other, 3).dtype == np.int64 and len(rows) == 2
    other.pages = []
    finished = _request([4])
    rows.get(finished, 1)
    finished.status = RequestStatus.FINISHED
    rows.drop_stale()  # `other` holds another list now; `finished` is done
    assert len(rows) == 1 and rows.get(request, 1).tolist() == [9]
