"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, params)`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.multimodal import ImageInput, build_image_inputs, image_bytes, split_chat_images
from engine.request import TokenLogprob
from engine.sampling_params import SamplingParams

# A prompt: text, token ids, or {"prompt": text or ids, "images": [...]} (vLLM's
# {"prompt": ..., "multi_modal_data": {"image": ...}} too). An image is bytes, a PIL
# image, a data: URL or a file path; the prompt holds one image placeholder per image.
Prompt = str | list[int] | dict[str, Any]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int
    finished: bool = True


class LLM:
    def __init__(self, model: str | Path | None = None, **options: Any) -> None:
        self.engine = Engine(model, EngineConfig(), **options)

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks, if any (Engine.close)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get_tokenizer(self):  # noqa: ANN201 - the engine's Tokenizer
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; results in prompt order. Every prompt is validated
        before any is queued, so a bad one raises and leaves the engine as it was."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(params, len(prompt_list))
        prepared = [self._prepare(p) for p in prompt_list]
        for (tokens, images), p in zip(prepared, params_list):
            self.engine.validate(tokens, p)
            self.engine.check_images(tokens, images)
        # Encode every image before queueing anything: a bad image raises here.
        prepared = [(tokens, self.engine.encode_images(images)) for tokens, images in prepared]
        ids = [self.engine.add_request(t, p, images=images)
               for (t, images), p in zip(prepared, params_list)]
        done = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out.request
        return [self._result(rid, done[rid], prompt) for rid, prompt in zip(ids, prompt_list)]

    def chat(self, messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them (OpenAI-style messages;
        content may hold `image_url` parts with data: URLs, or `image` parts)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidRequestError("messages must be a non-empty list")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts: list[Prompt] = []
        tokenizer = self.engine.tokenizer
        for conversation in conversations:
            template_messages, sources = split_chat_images(list(conversation))
            text = tokenizer.apply_chat_template(template_messages, add_generation_prompt)
            prompts.append({"prompt": tokenizer.encode(text, add_special_tokens=False), "images": sources,
                            "text": text})
        return self.generate(prompts, params)

    def _prepare(self, prompt: Prompt) -> tuple[list[int], list[ImageInput]]:
        """(token ids with image placeholders expanded, the prompt's images)."""
        if not isinstance(prompt, dict):
            return self.engine.tokenize_prompt(prompt), []
        if "prompt" not in prompt:
            raise InvalidRequestError("a prompt dict needs a 'prompt' (text or token ids)")
        sources = prompt.get("images")
        if sources is None:
            sources = (prompt.get("multi_modal_data") or {}).get("image", [])
        if not isinstance(sources, (list, tuple)):
            sources = [sources]
        tokens = self.engine.tokenize_prompt(prompt["prompt"])
        if not sources:
            return tokens, []
        info = self.engine.multimodal
        if info is None:
            raise InvalidRequestError("this model does not take images")
        return build_image_inputs(tokens, [image_bytes(s) for s in sources], info)

    def _result(self, request_id: str, request: Any, prompt: Prompt) -> RequestOutput:
        completion = CompletionOutput(
            index=0, text=self.engine.output_text(request), token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason,
            logprobs=list(request.logprobs) if request.params.logprobs is not None else None,
            stop_reason=request.stop_reason)
        if isinstance(prompt, dict):
            prompt = prompt.get("text", prompt["prompt"])
        return RequestOutput(request_id, prompt if isinstance(prompt, str) else None,
                             list(request.prompt_token_ids), [completion], request.num_cached_tokens)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt of token ids
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise InvalidRequestError("no prompts given")
        return list(prompts)
    raise InvalidRequestError("prompts must be a string, a list of token ids, a prompt dict, or a list of those")


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise InvalidRequestError(f"{len(params)} sampling params for {count} prompts")
    return list(params)
