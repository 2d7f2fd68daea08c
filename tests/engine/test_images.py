"""The engine with images beyond the transformers comparison: preemption and recompute,
embeddings re-encoded from bytes when a recompute needs them, bad image inputs."""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from PIL import Image

from engine import LLM, Engine, SamplingParams
from engine.errors import InvalidRequestError
from engine.multimodal import build_image_inputs


def png(seed: int, size: int = 48) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size + 5, 3), generator=gen, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def prompts(engine: Engine, count: int) -> list[tuple[list[int], list]]:
    out = []
    for i in range(count):
        ids = engine.tokenizer.encode(f"image {i}: <image> and <image>, compare them please")
        out.append(build_image_inputs(ids, [png(i), png(100 + i)], engine.multimodal))
    return out


def greedy(engine: Engine, cases: list[tuple[list[int], list]], max_tokens: int = 24) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params, images=images) for p, images in cases]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.request.output_token_ids)
    return [done[i] for i in ids]


def test_preemption_with_images_matches_unconstrained() -> None:
    roomy = Engine("tiny-vlm")
    expected = greedy(roomy, prompts(roomy, 6))
    tight = Engine("tiny-vlm", num_pages=12, max_num_batched_tokens=32)
    assert greedy(tight, prompts(tight, 6)) == expected
    assert tight.scheduler.num_preemptions > 0
    tight.check_page_invariants()


def test_recompute_encodes_missing_embeddings_from_bytes() -> None:
    engine = Engine("tiny-vlm")
    (prompt, images), = prompts(engine, 1)
    expected = greedy(engine, [(prompt, images)])
    engine.free_cache()
    before = engine.counters.images_encoded_total
    # As on a decode worker whose KV came from prefill: bytes and hashes, no embeddings.
    request_id = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                                    images=images)
    request = engine.scheduler.waiting[-1]
    assert request.request_id == request_id
    request.images = tuple(dataclasses.replace(i, embedding=None) for i in request.images)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [t for out in engine.step() for t in out.new_token_ids]
    assert outputs == expected[0]
    assert engine.counters.images_encoded_total == before + 2 + 2  # at add, then again for the recompute


def test_bad_image_inputs_queue_nothing() -> None:
    llm = LLM("tiny-vlm")
    good = {"prompt": "a <image> b", "images": [png(1)]}
    cases = [
        ([good, {"prompt": "c <image>", "images": [b"not an image"]}], "not an image"),
        ([good, {"prompt": "c <image> <image>", "images": [png(2)]}], "placeholder"),
        ([good, {"prompt": "no placeholder", "images": [png(2)]}], "placeholder"),
        ([good, {"prompt": "x <image>", "images": [12]}], "must be bytes"),
        ([good, {"images": [png(2)]}], "needs a 'prompt'"),
    ]
    for batch, words in cases:
        with pytest.raises(InvalidRequestError, match=words):
            llm.generate(batch, SamplingParams(max_tokens=2))
        assert not llm.engine.has_unfinished_requests() and not llm.engine.requests
    text_only = LLM()
    with pytest.raises(InvalidRequestError, match="does not take images"):
        text_only.generate(good)
