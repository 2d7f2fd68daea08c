"""Numbers from a run: latency percentiles, throughput, goodput under SLOs, and the
results file.

- TTFT: send to first token; ITL: gaps between consecutive tokens (tokens of one
  streamed chunk share its arrival time); TPOT: (end-to-end - TTFT) / (output tokens - 1)
  per request; E2E: send to last token.
- Throughput divides by the run's duration (first send to last token).
- Goodput: completed requests per second that met every given SLO (TTFT, mean ITL of
  the request, TPOT, E2E); attainment: their share of the requests sent.
Percentiles interpolate linearly between the nearest ranks.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.client.runner import RunResult
from bench.client.transport import RequestTiming

SLO_KEYS = ("ttft", "itl", "tpot", "e2e")


class SloError(ValueError):
    """An --slo value that does not parse."""


@dataclass(frozen=True)
class Slo:
    """Latency bounds in seconds; None: not constrained."""

    ttft: float | None = None
    itl: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @classmethod
    def parse(cls, text: str) -> Slo:
        """`ttft=0.5,itl=50ms,...`: seconds, or with a `ms`/`s` suffix."""
        bounds: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip().lower()
            if not eq or key not in SLO_KEYS:
                raise SloError(f"bad SLO {item!r}: use KEY=SECONDS with KEY one of {', '.join(SLO_KEYS)}")
            bounds[key] = _seconds(value.strip(), item)
        return cls(**bounds)

    def met(self, timing: RequestTiming) -> bool:
        if not timing.ok:
            return False
        itls = timing.itls
        checks = ((self.ttft, timing.ttft), (self.itl, statistics.mean(itls) if itls else None),
                  (self.tpot, timing.tpot), (self.e2e, timing.e2e))
        return all(bound is None or value is None or value <= bound for bound, value in checks)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _seconds(value: str, item: str) -> float:
    scale = 1.0
    if value.endswith("ms"):
        value, scale = value[:-2], 1e-3
    elif value.endswith("s"):
        value = value[:-1]
    try:
        seconds = float(value) * scale
    except ValueError:
        raise SloError(f"bad SLO {item!r}: {value!r} is not a number") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise SloError(f"bad SLO {item!r}: the bound must be a positive number of seconds")
    return seconds


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between ranks; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    """Seconds; None when there were no values."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        if not values:
            return cls(0, None, None, None, None, None, None)
        return cls(len(values), statistics.fmean(values), percentile(values, 50), percentile(values, 90),
                   percentile(values, 99), min(values), max(values))


@dataclass(frozen=True)
class Summary:
    label: str
    request_rate: float | None
    concurrency: int | None
    planned: int
    sent: int
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    request_throughput: float
    input_token_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    prompt_tokens: int
    output_tokens: int
    ttft: Stats
    itl: Stats
    tpot: Stats
    e2e: Stats
    slo: dict[str, float] = field(default_factory=dict)
    good: int = 0
    goodput: float = 0.0  # requests/s that met the SLO
    slo_attainment: float = 0.0  # good / sent

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.request_rate == math.inf:
            out["request_rate"] = "inf"  # JSON has no infinity
        return out


def summarize(result: RunResult, slo: Slo) -> Summary:
    timings = result.timings
    ok = [t for t in timings if t.ok]
    errors: dict[str, int] = {}
    for t in timings:
        if not t.ok:
            errors[t.error or "no token"] = errors.get(t.error or "no token", 0) + 1
    duration = result.duration_s
    rate = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    prompt, output = sum(t.prompt_tokens for t in ok), sum(t.output_tokens for t in ok)
    good = sum(slo.met(t) for t in ok)
    return Summary(
        result.shape.label, result.shape.request_rate, result.shape.concurrency, result.planned, len(timings),
        len(ok), len(timings) - len(ok), errors, duration, rate(len(ok)), rate(prompt), rate(output),
        rate(prompt + output), prompt, output, Stats.of([t.ttft for t in ok]),
        Stats.of([x for t in ok for x in t.itls]), Stats.of([t.tpot for t in ok if t.tpot is not None]),
        Stats.of([t.e2e for t in ok]), slo.to_dict(), good, rate(good), good / len(timings) if timings else 0.0)


def request_records(result: RunResult) -> list[dict[str, Any]]:
    """Per request, for the results file (seconds after the run's first send)."""
    origin = min((t.start for t in result.timings), default=0.0)
    return [{"conversation": t.conversation, "turn": t.turn, "start_s": t.start - origin,
             "ttft_s": t.ttft if t.ok else None, "e2e_s": t.e2e if t.ok else None, "tpot_s": t.tpot if t.ok else None,
             "prompt_tokens": t.prompt_tokens, "output_tokens": t.output_tokens, "error": t.error,
             "lateness_s": (t.start - t.scheduled) if t.scheduled is not None else None}
            for t in result.timings]


def format_summary(s: Summary) -> str:
    lines = [f"--- {s.label}",
             f"requests: {s.completed} ok, {s.failed} failed of {s.sent} sent ({s.planned} planned)"
             + (f"; first error: {next(iter(s.errors))}" if s.errors else ""),
             f"duration {s.duration_s:.2f} s; {s.request_throughput:.2f} req/s; output {s.output_token_throughput:.1f} "
             f"tok/s; input {s.input_token_throughput:.1f} tok/s; total {s.total_token_throughput:.1f} tok/s"]
    for name, stats in (("TTFT", s.ttft), ("ITL", s.itl), ("TPOT", s.tpot), ("E2E", s.e2e)):
        lines.append(f"{name + ' (ms)':<10} " + "  ".join(f"{key} {_ms(getattr(stats, key)):>9}"
                                                        for key in ("mean", "p50", "p90", "p99", "max")))
    if s.slo:
        bounds = ", ".join(f"{k} <= {v * 1e3:g} ms" for k, v in s.slo.items())
        lines.append(f"goodput ({bounds}): {s.goodput:.2f} req/s; SLO attainment {s.slo_attainment:.1%} "
                     f"({s.good}/{s.sent})")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"
