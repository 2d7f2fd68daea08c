"""OpenAI response bodies: chat.completion / text_completion objects, their streamed
chunks, usage, logprobs and errors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.tokenizer import Tokenizer
from proto import epd_pb2
from router.errors import RouterError
from router.service import Finish, TokenDelta, Usage


def error_body(exc: RouterError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}}


def usage_body(usages: list[Usage], prompt_counted: list[bool]) -> dict[str, Any]:
    """Usage of a response: each prompt counted once however many choices it has."""
    prompt = sum(u.prompt_tokens for u, counted in zip(usages, prompt_counted) if counted)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum(u.cached_tokens for u, counted in zip(usages, prompt_counted) if counted)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass
class Choice:
    """One choice's accumulated output (non-streaming), or its streaming progress."""

    index: int
    text: str = ""
    started: bool = False
    text_offset: int = 0
    finish: Finish | None = None

    def __post_init__(self) -> None:
        self.logprobs: list[epd_pb2.TokenLogprob] = []


class ResponseFormatter:
    """Builds one response's bodies. `kind` is "chat" or "completion"."""

    def __init__(self, kind: str, response_id: str, model: str, created: int, tokenizer: Tokenizer,
                 logprobs: bool) -> None:
        self.kind = kind
        self.response_id = response_id
        self.model = model
        self.created = created
        self._tokenizer = tokenizer
        self._logprobs = logprobs
        self._text_frames: dict[int, tuple[bytes, bytes] | None] = {}  # choice index -> SSE bytes around the text

    def _envelope(self, stream: bool) -> dict[str, Any]:
        obj = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        if stream and self.kind == "chat":
            obj = "chat.completion.chunk"
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}

    def _token(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    # -- logprobs --------------------------------------------------------------------

    def _chat_logprobs(self, entries: list[epd_pb2.TokenLogprob]) -> dict[str, Any] | None:
        if not self._logprobs:
            return None

        def item(token_id: int, logprob: float) -> dict[str, Any]:
            token = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t.token_id, t.logprob) for t in e.top]}
                            for e in entries]}

    def _completion_logprobs(self, entries: list[epd_pb2.TokenLogprob], offset: int) -> dict[str, Any] | None:
        if not self._logprobs:
            return None
        tokens = [self._token(e.token_id) for e in entries]
        offsets, position = [], offset
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token(t.token_id): t.logprob for t in e.top} for e in entries],
                "text_offset": offsets}

    def _logprobs_of(self, entries: list[epd_pb2.TokenLogprob], offset: int) -> dict[str, Any] | None:
        if self.kind == "chat":
            return self._chat_logprobs(entries)
        return self._completion_logprobs(entries, offset)

    # -- streaming -------------------------------------------------------------------

    def stream_chunks(self, choice: Choice, event: TokenDelta | Finish) -> list[dict[str, Any]]:
        """Chunks for one event of one choice (a role chunk first for chat)."""
        chunks = []
        if self.kind == "chat" and not choice.started:
            chunks.append(self._chunk(choice.index, {"role": "assistant", "content": ""}, None, None))
        choice.started = True
        if isinstance(event, TokenDelta):
            logprobs = self._logprobs_of(event.logprobs, choice.text_offset) if event.logprobs else None
            choice.text_offset += len(event.text)
            if event.text or logprobs:
                delta = {"content": event.text} if self.kind == "chat" else event.text
                chunks.append(self._chunk(choice.index, delta, logprobs, None))
            return chunks
        chunks.append(self._chunk(choice.index, {} if self.kind == "chat" else "", None, event))
        return chunks

    def stream_bytes(self, choice: Choice, event: TokenDelta | Finish) -> bytes:
        """The SSE bytes of `stream_chunks(choice, event)`. A text delta of a started
        choice without logprobs (nearly every event) is the same bytes, spliced from a
        frame rendered once per choice: only the text is JSON-encoded per token."""
        if choice.started and isinstance(event, TokenDelta) and not event.logprobs:
            frame = self._text_frame(choice.index)
            choice.text_offset += len(event.text)
            if not event.text:
                return b""
            if frame is not None:
                return frame[0] + json.dumps(event.text, ensure_ascii=False).encode() + frame[1]
            delta = {"content": event.text} if self.kind == "chat" else event.text
            return sse_bytes(self._chunk(choice.index, delta, None, None))
        return b"".join(sse_bytes(chunk) for chunk in self.stream_chunks(choice, event))

    def _text_frame(self, index: int) -> tuple[bytes, bytes] | None:
        if index not in self._text_frames:
            marker = "\u0001epd-text\u0001"  # JSON-escaped: appears nowhere else in the chunk
            delta = {"content": marker} if self.kind == "chat" else marker
            parts = sse_bytes(self._chunk(index, delta, None, None)).split(json.dumps(marker).encode())
            self._text_frames[index] = (parts[0], parts[1]) if len(parts) == 2 else None
        return self._text_frames[index]

    def _chunk(self, index: int, delta: Any, logprobs: dict[str, Any] | None, finish: Finish | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs,
                                  "finish_reason": finish.reason if finish else None}
        if finish is not None:
            choice["stop_reason"] = finish.stop_reason
        choice["delta" if self.kind == "chat" else "text"] = delta
        return {**self._envelope(stream=True), "choices": [choice], "usage": None}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope(stream=True), "choices": [], "usage": usage}

    # -- whole response --------------------------------------------------------------

    def add(self, choice: Choice, event: TokenDelta | Finish) -> None:
        if isinstance(event, TokenDelta):
            choice.text += event.text
            choice.logprobs.extend(event.logprobs)
        else:
            choice.finish = event

    def response(self, choices: list[Choice], usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope(stream=False), "choices": [self._choice_body(c) for c in choices], "usage": usage}

    def _choice_body(self, choice: Choice) -> dict[str, Any]:
        finish = choice.finish
        body: dict[str, Any] = {"index": choice.index, "logprobs": self._logprobs_of(choice.logprobs, 0),
                                "finish_reason": finish.reason if finish else None,
                                "stop_reason": finish.stop_reason if finish else None}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", "content": choice.text}
        else:
            body["text"] = choice.text
        return body


def sse_bytes(body: dict[str, Any]) -> bytes:
    """One server-sent event carrying `body` as JSON."""
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
