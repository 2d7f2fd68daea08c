"""Stop strings: the output text is cut before the first stop string, wherever it falls
in a long output (the per-step check decodes only a window of recent tokens)."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_path: Path) -> LLM:
    return LLM(tiny_model_path, num_pages=256, page_size=16)


def test_stop_strings_cut_long_outputs_where_a_full_decode_would(llm: LLM) -> None:
    prompts = ["The quick brown fox", "Once upon a time", "0 1 2 3"]
    plain = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    references = [out.outputs[0] for out in llm.generate(prompts, plain)]
    tokenizer = llm.get_tokenizer()
    checked = 0
    for prompt, ref in zip(prompts, references):
        text = ref.text
        # Stop strings taken from the reference output at early, middle and late
        # positions (late ones lie far outside the first window of recent tokens).
        for start in (3, len(text) // 2, len(text) - 12):
            for length in (1, 5, 11):
                stop = text[start:start + length]
                if not stop.strip():
                    continue
                expected = text[:text.find(stop)]
                params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, stop=[stop])
                got = llm.generate([prompt], params)[0].outputs[0]
                assert got.text == expected, (stop, got.text, expected)
                assert got.finish_reason == "stop"
                # Generation stopped at the token that completed the stop string.
                assert got.token_ids == ref.token_ids[:len(got.token_ids)]
                assert stop in tokenizer.decode(got.token_ids, True)
                assert stop not in tokenizer.decode(got.token_ids[:-1], True)
                checked += 1
    assert checked >= 15


def test_a_stop_string_that_never_appears_runs_to_max_tokens(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True, stop=["\x00never\x00"])
    out = llm.generate(["The quick brown fox"], params)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 120
