"""Sampling parameters of one request, validated on construction."""
from __future__ import annotations

import math

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """What to generate. `temperature == 0` means greedy. `top_k=None`, `top_p=1.0` and
    `min_p=0.0` keep every token. `logprobs=k` returns each sampled token's logprob and
    the k most likely alternatives (k may be 0)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # Higher is more important: under memory pressure the prefix cache evicts pages whose
    # last user had a lower priority first (then least recently used first).
    priority: int = 0
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW are greedy: dividing logits by a subnormal
        temperature overflows to inf and NaN probabilities (one request must not be
        able to fail a step its batch shares)."""
        return self.temperature < GREEDY_BELOW

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the host per row: argmax of the raw logits."""
        return (self.greedy and self.logprobs is None and self.repetition_penalty == 1.0
                and not self.frequency_penalty and not self.presence_penalty)

    def _validate(self) -> None:
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, minimum=1)
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=None)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > 20:
                raise InvalidRequestError(f"logprobs must be <= 20, got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids entry", token, minimum=0)
        _check_int("priority", self.priority, minimum=-PRIORITY_LIMIT)
        if self.priority > PRIORITY_LIMIT:
            raise InvalidRequestError(f"priority must be <= {PRIORITY_LIMIT}, got {self.priority}")


GREEDY_BELOW = 1e-5
PRIORITY_LIMIT = 2**31 - 1  # the wire's int32


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidRequestError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
