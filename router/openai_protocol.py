"""The OpenAI request bodies the router accepts (chat and completions, with vLLM's
extra sampling fields) and their translation into the router's requests.

Types are strict: `"1"` is not an integer and `1` is not a boolean, as in OpenAI's
API; unknown fields are ignored. Every problem becomes an `InvalidRequest` naming the
field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.errors import InvalidRequest, RequestTooLarge

MAX_N = 128
_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids, or a list of token id lists",
    "stop": "must be a string or a list of strings",
    "messages": "must be a list of messages, each with a `role` and a string or a list of text and "
                "image_url parts as `content`",
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class ImageURL(_Strict):
    url: str
    detail: str | None = None  # accepted, not used: every image takes the model's fixed token count


class ContentPart(_Strict):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class SamplingFields(_Strict):
    """Fields both endpoints share (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # -1 or 0: no top-k (vLLM)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    priority: int = 0  # prefix-cache eviction: higher keeps its pages longer
    # A turn of this session (router/sessions.py; also the X-Session-Id header), and how
    # many leading prompt tokens to pin in the workers' caches ("system": chat's leading
    # system messages).
    session_id: str | None = None
    pin_prefix: int | str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False


def parse_body(raw: bytes) -> dict[str, Any]:
    """UTF-8 JSON object or InvalidRequest."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # nesting deeper than the decoder's stack allows
        raise InvalidRequest("the request body nests arrays or objects too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer past int()'s digit limit
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    # A \ud800-\udfff escape decodes to a lone surrogate, which no later step can encode.
    if "\\ud" in text.lower():
        _check_strings(body)
    return body


def _no_constant(name: str) -> Any:
    raise InvalidRequest(f"the request body holds {name}, which JSON does not allow (numbers must be finite)")


def _check_strings(body: Any) -> None:
    """Iterative: a body nested as deep as the decoder allows must not overflow the stack here."""
    pending = [body]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest("the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff) "
                                     "that is not valid Unicode") from None
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def validate_model(cls: type[SamplingFields], body: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> InvalidRequest:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else None
    if field in _UNION_HINTS and len(exc.errors()) > 1:
        return InvalidRequest(f"`{field}` {_UNION_HINTS[field]}", param=field)
    where = ".".join(str(p) for p in error["loc"])
    return InvalidRequest(f"`{where}`: {error['msg']}" if where else error["msg"], param=field)


@dataclass(frozen=True)
class PromptSpec:
    """One prompt: text to tokenize, token ids, or chat messages."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None


def sampling_options(req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    """SamplingParams' fields from a request (seed left to the caller, per choice)."""
    if req.n < 1 or req.n > MAX_N:
        raise InvalidRequest(f"n must be between 1 and {MAX_N}, got {req.n}", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return dict(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=None if req.top_k in (None, -1, 0) else req.top_k, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty, stop=tuple(stop),
        stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
        logprobs=logprobs, skip_special_tokens=req.skip_special_tokens, priority=req.priority)


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("`logprobs` must be true when `top_logprobs` is set", param="top_logprobs")
    if not req.logprobs:
        return None
    top = req.top_logprobs or 0
    if not 0 <= top <= 20:
        raise InvalidRequest(f"top_logprobs must be between 0 and 20, got {top}", param="top_logprobs")
    return top


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def chat_messages(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """(messages as the chat template wants them, each image's URL in prompt order).
    Content without images becomes one string (text parts joined); content with images
    keeps its parts, each image as `{"type": "image"}` (the template's placeholder)."""
    out, urls = [], []
    for index, message in enumerate(req.messages):
        content = message.content
        if isinstance(content, list):
            parts: list[dict[str, Any]] = []
            for part in content:
                if part.type == "text" and part.text is not None:
                    parts.append({"type": "text", "text": part.text})
                elif part.type == "image_url" and part.image_url is not None:
                    urls.append(part.image_url.url)
                    parts.append({"type": "image"})
                else:
                    raise InvalidRequest(f"messages[{index}]: content parts must be text (with `text`) "
                                         "or image_url (with `image_url.url`)", param="messages")
            if any(p["type"] == "image" for p in parts):
                content = parts
            else:
                content = "".join(p["text"] for p in parts)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        out.append(entry)
    return out, urls


def completion_prompts(req: CompletionRequest) -> list[PromptSpec]:
    prompt = req.prompt
    if req.echo:
        raise InvalidRequest("`echo` is not supported", param="echo")
    if isinstance(prompt, str):
        return [PromptSpec(text=prompt)]
    if not prompt:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [PromptSpec(token_ids=list(prompt))]
    if all(isinstance(p, str) for p in prompt):
        return [PromptSpec(text=p) for p in prompt]
    return [PromptSpec(token_ids=list(p)) for p in prompt]


def check_body_size(content_length: str | None, limit: int) -> None:
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise RequestTooLarge(f"the request body is {content_length} bytes; the limit is {limit}")


