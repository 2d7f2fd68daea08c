"""Streamed text: UTF-8 safety and stop strings."""
from __future__ import annotations

import pytest

from engine.tokenizer import Tokenizer
from router.detokenize import TextStream

TEXT = "Hello wörld! 你好 The quick brown fox jumps over the lazy dog 🙂 done"


def run(tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...], chunk: int) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    deltas = []
    for start in range(0, len(ids), chunk):
        deltas.append(stream.push(ids[start:start + chunk]))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return deltas, stream


@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_never_split_characters(tokenizer: Tokenizer, chunk: int) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, stream = run(tokenizer, ids, (), chunk)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == stream.text == tokenizer.decode(ids)


@pytest.mark.parametrize("stop", [("fox",), ("好 T", "ö"), ("dog 🙂",), ("zzz",), ("s over", "quick")])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stop_strings_are_held_back_and_cut(tokenizer: Tokenizer, stop: tuple[str, ...], chunk: int) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, stream = run(tokenizer, ids, stop, chunk)
    full = tokenizer.decode(ids)
    hits = [(full.find(s), s) for s in stop if s in full]
    expected = full[:min(hits)[0]] if hits else full
    assert "".join(deltas) == stream.text == expected
    assert stream.stop_string == (min(hits)[1] if hits else None)
    streamed = ""
    for delta in deltas:
        streamed += delta
        assert not any(s in streamed for s in stop)


def test_incomplete_character_at_the_end_flushes_as_replacement(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("你", add_special_tokens=False)
    assert len(ids) > 1
    stream = TextStream(tokenizer)
    assert stream.push(ids[:-1]) == ""
    assert stream.finish() == tokenizer.decode(ids[:-1])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_windowed_deltas_add_up_to_the_full_decode(tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
    """Random ids (invalid UTF-8 byte runs and special tokens included), pushed in
    random pieces: the windowed deltas always add up to one decode of every id."""
    import random

    from engine.tokenizer import IncrementalDetokenizer
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        detok, out, i = IncrementalDetokenizer(tokenizer, skip_special_tokens), "", 0
        while i < len(ids):
            step = rng.randrange(1, 4)
            out += detok.add(ids[i:i + step])
            i += step
        out += detok.flush()
        assert out == detok.text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
