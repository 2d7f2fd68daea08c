"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, params)`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.request import TokenLogprob
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


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

    def get_tokenizer(self):  # noqa: ANN201 - the engine's Tokenizer
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; results in prompt order. Every prompt is validated
        before any is queued, so a bad one raises and leaves the engine as it was."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(params, len(prompt_list))
        tokenized = [self.engine.tokenize_prompt(p) for p in prompt_list]
        for ids, p in zip(tokenized, params_list):
            self.engine.validate(ids, p)
        ids = [self.engine.add_request(t, p) for t, p in zip(tokenized, params_list)]
        done = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out.request
        return [self._result(rid, done[rid], prompt) for rid, prompt in zip(ids, prompt_list)]

    def _result(self, request_id: str, request: Any, prompt: Prompt) -> RequestOutput:
        completion = CompletionOutput(
            index=0, text=self.engine.output_text(request), token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason,
            logprobs=list(request.logprobs) if request.params.logprobs is not None else None,
            stop_reason=request.stop_reason)
        return RequestOutput(request_id, prompt if isinstance(prompt, str) else None,
                             list(request.prompt_token_ids), [completion], request.num_cached_tokens)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt of token ids
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise InvalidRequestError("no prompts given")
        return list(prompts)
    raise InvalidRequestError("prompts must be a string, a list of token ids, or a list of those")


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise InvalidRequestError(f"{len(params)} sampling params for {count} prompts")
    return list(params)
