"""Tokenizer and chat template of a Hugging Face-format model directory.

Reads tokenizer.json through the `tokenizers` library and tokenizer_config.json for the
special tokens and the Jinja chat template, which renders in a sandbox.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from engine.errors import ConfigError, InvalidRequestError


def _raise(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, config: dict[str, Any]) -> None:
        self._backend = backend
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        self.special_ids = {
            tid for tok, tid in backend.get_vocab(with_added_tokens=True).items()
            if tok in {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        }
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        self._template = env.from_string(self.chat_template) if self.chat_template else None

    @staticmethod
    def from_pretrained(path: str | Path) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ConfigError(f"no tokenizer.json in model directory {path}")
        config_file = path / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            backend = _HFTokenizer.from_file(str(tokenizer_file))
        except (json.JSONDecodeError, Exception) as exc:  # tokenizers raises plain Exception
            raise ConfigError(f"cannot read tokenizer in {path}: {exc}") from exc
        return Tokenizer(backend, config)

    def vocab(self) -> dict[str, int]:
        """Token text -> id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render messages to the prompt text. The text already holds the BOS token, so
        encode it with add_special_tokens=False."""
        if self._template is None:
            raise InvalidRequestError("this model has no chat template; use completions instead")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         **kwargs)
        except TemplateError as exc:
            raise InvalidRequestError(f"chat template failed: {exc}") from exc


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a UTF-8
    character: text whose last character is incomplete is held back until it completes.

    Each step decodes a short window, not every id so far: the delta is the decode of
    ids[prefix:] minus the decode of ids[prefix:read] (both start at the same token, so
    a decoder's handling of a leading space or partial bytes applies to both alike), and
    the window moves on once a delta came out whole."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are in `text`
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        decode, window = self._tokenizer.decode, self._ids[self._prefix:]
        before = decode(window[:self._read - self._prefix], skip_special_tokens=self._skip)
        now = decode(window, skip_special_tokens=self._skip)
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""  # an incomplete character (or nothing visible yet): wait for more ids
        delta = now[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        window = self._ids[self._prefix:]
        before = self._tokenizer.decode(window[:self._read - self._prefix], skip_special_tokens=self._skip)
        delta = self._tokenizer.decode(window, skip_special_tokens=self._skip)[len(before):]
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta
