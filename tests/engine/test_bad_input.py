"""Bad input raises a clear error naming the problem; the engine keeps serving."""
from __future__ import annotations

import json

import pytest

from engine import LLM, ConfigError, Engine, InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_path) -> Engine:  # noqa: ANN001
    return Engine(tiny_model_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"max_tokens": -3}, "max_tokens must be >= 1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"min_p": 2.0}, "min_p must be in"),
    ({"max_tokens": "5"}, "max_tokens must be an integer"),
    ({"logprobs": 50}, "logprobs must be <= 20"),
])
def test_bad_sampling_params(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_rejected_while_others_keep_running(engine: Engine) -> None:
    good = engine.add_request("Hello there", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.add_request("", SamplingParams())
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(InvalidRequestError, match="context length is 1024"):
        engine.add_request(list(range(1, 400)) * 3, SamplingParams())
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request([1, 2, 99999], SamplingParams())
    with pytest.raises(InvalidRequestError, match="list of integer token ids"):
        engine.add_request([1, "a"], SamplingParams())  # type: ignore[list-item]
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [good]
    assert len(finished[0].request.output_token_ids) == 8
    engine.check_page_invariants()


def test_llm_generate_validates_all_before_queueing(tiny_model_path) -> None:  # noqa: ANN001
    llm = LLM(tiny_model_path)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        llm.generate(["fine prompt", ""], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.generate(["fine prompt"], SamplingParams(max_tokens=4))[0].outputs[0].token_ids) >= 1


def test_unknown_model_directory(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="model directory not found: .*nope"):
        Engine(tmp_path / "nope")


@pytest.mark.parametrize("content, message", [
    ("{not json", "malformed config.json"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"architectures": ["GPT2LMHeadModel"]}), "unsupported architecture"),
    (json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 10}), "missing required field 'hidden_size'"),
    (json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": -4,
                 "num_attention_heads": 2, "intermediate_size": 8, "num_hidden_layers": 1}),
     "'hidden_size' must be a positive integer"),
])
def test_malformed_config(tmp_path, tiny_model_path, content: str, message: str) -> None:  # noqa: ANN001
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        Engine(tmp_path)


def test_missing_weights_named(tmp_path, tiny_model_path) -> None:  # noqa: ANN001
    import shutil

    from safetensors.torch import load_file, save_file
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_path / name, tmp_path / name)
    tensors = load_file(str(tiny_model_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="layers.1.mlp.gate_up_proj.weight"):
        Engine(tmp_path)


def test_dummy_load_format_needs_no_weights(tmp_path, tiny_model_path) -> None:  # noqa: ANN001
    import shutil
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_path / name, tmp_path / name)
    llm = LLM(tmp_path, load_format="dummy")
    assert len(llm.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids) == 3


def test_subnormal_temperature_is_greedy_and_infinities_are_refused() -> None:
    """A temperature of 5e-324 once overflowed the logits to NaN and failed the whole
    step; it now samples greedily, beside another request that really samples."""
    from engine import LLM
    llm = LLM()
    tiny, sampled = llm.generate(["hello there", "x y"], [SamplingParams(temperature=5e-324, max_tokens=8, seed=1),
                                                          SamplingParams(temperature=0.9, max_tokens=8, seed=2)])
    greedy, = llm.generate(["hello there"], SamplingParams(temperature=0, max_tokens=8))
    assert tiny.outputs[0].token_ids == greedy.outputs[0].token_ids
    assert len(sampled.outputs[0].token_ids) == 8
    for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty"):
        for value in (float("inf"), float("-inf")):
            with pytest.raises(InvalidRequestError, match=f"{name} must be a finite number"):
                SamplingParams(**{name: value})


def test_dummy_uniform_load_format_draws_small_uniform_weights(tmp_path, tiny_model_path) -> None:  # noqa: ANN001
    import shutil
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_path / name, tmp_path / name)
    llm = LLM(tmp_path, load_format="dummy-uniform")
    weights = {name: p.detach() for name, p in llm.engine.runner.model.named_parameters()}
    matrices = [w for name, w in weights.items() if not name.endswith("norm.weight")]
    assert all(float(w.abs().max()) <= 1e-3 for w in matrices)
    assert float(matrices[0].abs().max()) > 5e-4  # uniform over the range, not a constant
    assert all(bool((w == 1).all()) for name, w in weights.items() if name.endswith("norm.weight"))
    assert len(llm.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids) == 3
    with pytest.raises(ConfigError, match="load_format must be"):
        LLM(tmp_path, load_format="random")
