"""Length distributions for prompts, outputs, turns and prefixes, written on the command
line as `KIND:PARAMS`:

    128 | fixed:128            always 128
    uniform:64:256             an integer in [64, 256], each equally likely
    normal:128:32              mean 128, standard deviation 32 (rounded)
    lognormal:128:0.5          median 128, sigma 0.5 of the log (long tail, like chat)
    exponential:128            mean 128

Every sample is clamped to [minimum, maximum] (at least 1), so a distribution with a
tail can never ask for an empty prompt.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

KINDS = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2, "exponential": 1}


class DistributionError(ValueError):
    """A distribution flag that does not parse; its message says what was expected."""


@dataclass(frozen=True)
class Distribution:
    kind: str
    params: tuple[float, ...]
    minimum: int = 1
    maximum: int | None = None

    @classmethod
    def parse(cls, text: str, minimum: int = 1, maximum: int | None = None) -> Distribution:
        """`text` as in the module docstring; raises DistributionError."""
        parts = text.strip().split(":")
        if len(parts) == 1:
            parts = ["fixed", *parts]
        kind, raw = parts[0].lower(), parts[1:]
        if kind not in KINDS:
            raise DistributionError(f"unknown distribution {kind!r} in {text!r}; use one of {', '.join(KINDS)}")
        if len(raw) != KINDS[kind]:
            raise DistributionError(f"{kind} takes {KINDS[kind]} parameter(s), got {text!r}")
        try:
            params = tuple(float(p) for p in raw)
        except ValueError:
            raise DistributionError(f"parameters of {text!r} must be numbers") from None
        _check(kind, params, text)
        return cls(kind, params, max(1, minimum), maximum)

    def sample(self, rng: random.Random) -> int:
        value = self._draw(rng)
        value = max(self.minimum, int(round(value)))
        return value if self.maximum is None else min(self.maximum, value)

    def _draw(self, rng: random.Random) -> float:
        p = self.params
        if self.kind == "fixed":
            return p[0]
        if self.kind == "uniform":
            return rng.randint(int(p[0]), int(p[1]))
        if self.kind == "normal":
            return rng.gauss(p[0], p[1])
        if self.kind == "lognormal":
            return rng.lognormvariate(math.log(p[0]), p[1])
        return rng.expovariate(1.0 / p[0])

    @property
    def upper_bound(self) -> int | None:
        """The largest value a sample can take, when the distribution has one."""
        if self.kind == "fixed":
            bound = int(self.params[0])
        elif self.kind == "uniform":
            bound = int(self.params[1])
        else:
            return self.maximum
        bound = max(self.minimum, bound)
        return bound if self.maximum is None else min(bound, self.maximum)

    def __str__(self) -> str:
        return ":".join([self.kind, *(f"{p:g}" for p in self.params)])


def _check(kind: str, params: tuple[float, ...], text: str) -> None:
    if any(not math.isfinite(p) for p in params):
        raise DistributionError(f"parameters of {text!r} must be finite")
    if kind in ("fixed", "exponential", "lognormal") and params[0] <= 0:
        raise DistributionError(f"{text!r}: the first parameter must be positive")
    if kind == "uniform" and not (1 <= params[0] <= params[1]):
        raise DistributionError(f"{text!r}: uniform needs 1 <= LOW <= HIGH")
    if kind == "uniform" and any(p != int(p) for p in params):
        raise DistributionError(f"{text!r}: uniform bounds must be integers")
    if kind in ("normal", "lognormal") and params[1] < 0:
        raise DistributionError(f"{text!r}: the spread must not be negative")
