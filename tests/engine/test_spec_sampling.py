"""Speculation, sampled: the emitted tokens are distributed exactly as the target's.

First the acceptance rule alone against known target distributions (chi-square
goodness of fit), then the engine end to end against non-speculative sampling (a
chi-square test of homogeneity per output position). Everything is seeded: the
statistics are fixed numbers, so the tests cannot flake; p > 0.01 is the bar."""
from __future__ import annotations

import torch

from engine import LLM, SamplingParams
from engine.spec.verify import rejection_sample


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square(dof): the regularized upper incomplete gamma."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed `counts` under `probs` (cells with expectation < 5 pooled)."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    statistic = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return chi2_sf(statistic, int(keep.sum()) - 1)


def homogeneity(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value that two count vectors come from one distribution (sparse cells pooled)."""
    table = torch.stack([a, b]).double()
    total = table.sum(dim=0)
    big = total >= 10
    table = torch.cat([table[:, big], table[:, ~big].sum(dim=1, keepdim=True)], dim=1)
    table = table[:, table.sum(dim=0) > 0]
    expected = table.sum(dim=1, keepdim=True) * table.sum(dim=0, keepdim=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    return chi2_sf(statistic, table.shape[1] - 1)


def _distributions(generator: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, vocab, generator=generator) * 1.5, dim=-1)


def test_chi2_helper_against_known_values() -> None:
    assert abs(chi2_sf(3.841458820694124, 1) - 0.05) < 1e-9
    assert abs(chi2_sf(11.070497693516351, 5) - 0.05) < 1e-9


def _check_rule(draft_probs: torch.Tensor | None, target: torch.Tensor, drafts: list[int], trials: int,
                check_second: bool = True) -> None:
    generator = torch.Generator().manual_seed(1234)
    vocab = target.shape[1]
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)  # the token after an accepted first draft
    draws = torch.Generator().manual_seed(99)
    for _ in range(trials):
        if draft_probs is not None:  # drafts drawn from q, independently of the verifier
            drafts = [int(torch.multinomial(draft_probs[i], 1, generator=draws)) for i in range(len(drafts))]
        out = rejection_sample(target, drafts, draft_probs, generator)
        first[out[0]] += 1
        if out[0] == drafts[0] and len(out) > 1:
            second[out[1]] += 1
    assert goodness_of_fit(first, target[0]) > 0.01
    if draft_probs is None and check_second:  # the first draft fixed: the next token must follow target row 1
        assert second.sum() > 1000
        assert goodness_of_fit(second, target[1]) > 0.01


def test_rejection_sampling_with_a_point_mass_draft_matches_target() -> None:
    target = _distributions(torch.Generator().manual_seed(5), 3, 6)
    drafts = [int(target[0].argmax()), int(target[1].argmin())]
    _check_rule(None, target, drafts, 6000)
    # A draft the target finds unlikely: mostly rejected, the distribution still exact.
    _check_rule(None, target, [int(target[0].argmin()), 0], 6000, check_second=False)


def test_rejection_sampling_with_a_draft_distribution_matches_target() -> None:
    gen = torch.Generator().manual_seed(6)
    target, q = _distributions(gen, 3, 6), _distributions(gen, 2, 6)
    _check_rule(q, target, [0, 0], 6000)


def test_rejection_sampling_detects_a_wrong_rule() -> None:
    """The test has power: always accepting a likely draft is visibly wrong."""
    target = _distributions(torch.Generator().manual_seed(5), 2, 6)
    draft = int(target[0].argmax())
    counts = torch.zeros(6)
    counts[draft] = 6000
    assert goodness_of_fit(counts, target[0]) < 1e-6


POSITIONS = 5


def _looping_prompt(model) -> list[int]:  # noqa: ANN001
    """A prompt that ends in the model's own greedy loop: sampled continuations often
    follow it, so n-gram lookup proposes tokens the target gives real probability."""
    greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    return [5, 6, 7] + LLM(model).generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids


def _sample_counts(model, seeds: range, vocab: int, **options) -> tuple[torch.Tensor, object]:  # noqa: ANN001
    llm = LLM(model, **options)
    params = [SamplingParams(temperature=0.9, top_k=6, max_tokens=POSITIONS, seed=s, ignore_eos=True) for s in seeds]
    counts = torch.zeros(POSITIONS, vocab)
    for result in llm.generate([_looping_prompt(model)] * len(seeds), params):
        for position, token in enumerate(result.outputs[0].token_ids):
            counts[position, token] += 1
    acct = llm.engine.check_page_invariants()
    assert acct.free + acct.cached == acct.total
    return counts, llm.engine


def check_sampling_matches(model, draft, **engine_options) -> list:  # noqa: ANN001
    """With each drafter (n-gram; the draft model `draft`), the token distribution at each
    position matches non-speculative sampling on the same engine options (chi-square
    homogeneity, p > 0.01); returns the speculative engines."""
    vocab = 512
    expected, _ = _sample_counts(model, range(0, 600), vocab, **engine_options)
    engines = []
    for options in ({"speculative": "ngram", "num_speculative_tokens": 3},
                    {"speculative": "draft", "num_speculative_tokens": 3, "speculative_draft_model": str(draft)}):
        got, engine = _sample_counts(model, range(10_000, 10_600), vocab, **engine_options, **options)
        stats = engine.speculation.stats
        assert 0 < stats.accepted_tokens_total < stats.draft_tokens_total  # both outcomes, many times
        for position in range(POSITIONS):
            assert homogeneity(expected[position], got[position]) > 0.01, (options, position)
        engines.append(engine)
    return engines


def test_engine_sampling_with_speculation_matches_non_speculative(loopy_model_path, small_draft_path) -> None:  # noqa: ANN001, E501
    check_sampling_matches(loopy_model_path, small_draft_path)
