"""PNG plots of a benchmark (matplotlib, the `bench` extra): latency CDFs of every run,
and for a sweep of request rates, throughput and SLO attainment against the rate."""
from __future__ import annotations

import math
from pathlib import Path

from bench.client.report import Summary
from bench.client.runner import RunResult


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():  # noqa: ANN202 - matplotlib has no stable public types
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable("matplotlib is not installed (pip install 'epd-serve[bench]'); "
                               "plots skipped") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    return [v * 1e3 for v in ordered], [(i + 1) / len(ordered) for i in range(len(ordered))]


def latency_cdfs(results: list[RunResult], path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    metrics = (("TTFT", lambda r: [t.ttft for t in r.timings if t.ok]),
               ("ITL", lambda r: [x for t in r.timings if t.ok for x in t.itls]),
               ("TPOT", lambda r: [t.tpot for t in r.timings if t.ok and t.tpot is not None]),
               ("E2E latency", lambda r: [t.e2e for t in r.timings if t.ok]))
    for axis, (name, values_of) in zip(axes.flat, metrics):
        for result in results:
            values = values_of(result)
            if values:
                xs, ys = _cdf(values)
                axis.step(xs, ys, where="post", label=result.shape.label)
        axis.set_title(f"{name} CDF")
        axis.set_xlabel("ms")
        axis.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        if len(results) > 1 or results and values_of(results[0]):
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _rates(summaries: list[Summary]) -> list[float]:
    return [s.request_rate if s.request_rate is not None and s.request_rate != math.inf else math.nan
            for s in summaries]


def throughput_vs_rate(summaries: list[Summary], path: Path) -> Path:
    plt = _pyplot()
    figure, left = plt.subplots(figsize=(8, 5))
    rates = _rates(summaries)
    left.plot(rates, [s.request_throughput for s in summaries], "o-", label="requests/s")
    left.plot(rates, [s.goodput for s in summaries], "s--", label="goodput (requests/s within SLO)")
    left.set_xlabel("offered request rate (requests/s)")
    left.set_ylabel("requests/s")
    right = left.twinx()
    right.plot(rates, [s.output_token_throughput for s in summaries], "^:", color="tab:green",
               label="output tokens/s")
    right.set_ylabel("output tokens/s")
    lines = left.get_lines() + right.get_lines()
    left.legend(lines, [line.get_label() for line in lines], loc="upper left", fontsize="small")
    left.grid(alpha=0.3)
    left.set_title("Throughput against request rate")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def slo_attainment_vs_rate(summaries: list[Summary], path: Path) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    axis.plot(_rates(summaries), [100 * s.slo_attainment for s in summaries], "o-")
    bounds = ", ".join(f"{k} <= {v * 1e3:g} ms" for k, v in (summaries[0].slo if summaries else {}).items())
    axis.set_title(f"SLO attainment against request rate ({bounds or 'no SLO given'})")
    axis.set_xlabel("offered request rate (requests/s)")
    axis.set_ylabel("requests within SLO (%)")
    axis.set_ylim(0, 102)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_plots(results: list[RunResult], summaries: list[Summary], directory: Path) -> list[Path]:
    """Every plot that applies; the sweep plots need two or more finite rates."""
    paths = [latency_cdfs(results, directory / "latency_cdf.png")]
    if sum(not math.isnan(r) for r in _rates(summaries)) >= 2:
        paths.append(throughput_vs_rate(summaries, directory / "throughput_vs_rate.png"))
        paths.append(slo_attainment_vs_rate(summaries, directory / "slo_attainment_vs_rate.png"))
    return paths
