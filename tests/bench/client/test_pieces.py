"""The benchmark client's pieces on their own: distributions, arrivals, percentiles,
SLOs, datasets, request bodies, the plain progress bar. (Against a real cluster:
tests/e2e/test_bench.py.)"""
from __future__ import annotations

import io
import json
import math
import random
import statistics
from pathlib import Path

import numpy as np
import pytest

from bench.client.distributions import Distribution, DistributionError
from bench.client.report import Slo, SloError, percentile
from bench.client.runner import Progress, arrival_offsets
from bench.client.transport import GrpcTransport, HttpTransport, Outgoing, RequestTiming, Sampling
from bench.client.workloads import DatasetError, Turn, WorkloadSpec, build


def test_distributions_sample_within_their_bounds() -> None:
    rng = random.Random(0)
    assert {Distribution.parse("7").sample(rng) for _ in range(20)} == {7}
    uniform = [Distribution.parse("uniform:3:9").sample(rng) for _ in range(2000)]
    assert min(uniform) == 3 and max(uniform) == 9
    normal = [Distribution.parse("normal:100:10").sample(rng) for _ in range(4000)]
    assert abs(statistics.mean(normal) - 100) < 1.5 and 8 < statistics.stdev(normal) < 12
    tail = Distribution.parse("exponential:5", maximum=12)
    values = [tail.sample(rng) for _ in range(2000)]
    assert min(values) >= 1 and max(values) == 12
    lognormal = [Distribution.parse("lognormal:50:0.5").sample(rng) for _ in range(4000)]
    assert 45 <= statistics.median(lognormal) <= 55


@pytest.mark.parametrize("text, message", [("gauss:1", "unknown distribution"), ("uniform:5", "takes 2"),
                                           ("uniform:9:3", "LOW <= HIGH"), ("fixed:0", "positive"),
                                           ("normal:5:-1", "spread"), ("uniform:1.5:3", "integers"),
                                           ("fixed:nan", "finite"), ("x", "must be numbers")])
def test_bad_distributions_say_why(text: str, message: str) -> None:
    with pytest.raises(DistributionError, match=message):
        Distribution.parse(text)


def test_poisson_arrivals_have_the_asked_rate() -> None:
    offsets = arrival_offsets(5000, 10.0, random.Random(1))
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 0.1) < 0.006 and abs(gaps.std() - 0.1) < 0.01  # exponential: std == mean
    assert arrival_offsets(4, math.inf, random.Random(1)) == [0.0] * 4


def test_percentiles_match_numpy() -> None:
    values = [random.Random(2).random() for _ in range(37)]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_slo_parses_units_and_judges_requests() -> None:
    slo = Slo.parse("ttft=200ms, itl=0.05,e2e=2s")
    assert (slo.ttft, slo.itl, slo.tpot, slo.e2e) == (0.2, 0.05, None, 2.0)
    fast = RequestTiming(0.0, token_times=[0.1, 0.12, 0.14], output_tokens=3)
    slow_first = RequestTiming(0.0, token_times=[0.3, 0.31], output_tokens=2)
    failed = RequestTiming(0.0, token_times=[0.1], error="boom")
    assert slo.met(fast) and not slo.met(slow_first) and not slo.met(failed)
    assert fast.tpot == pytest.approx(0.02)
    for bad in ("ttft", "speed=1", "ttft=-1", "itl=abc"):
        with pytest.raises(SloError):
            Slo.parse(bad)


def test_shared_prefix_and_multimodal_workloads(tmp_path: Path) -> None:
    prefix = build(WorkloadSpec(kind="shared-prefix", num_requests=6, prefix_groups=2,
                                prefix_len=Distribution.parse("10"), input_len=Distribution.parse("4")))
    prompts = [c.turns[0].token_ids for c in prefix]
    assert all(len(p) == 14 for p in prompts)
    assert len({p[:10] for p in prompts}) == 2 and len({p[10:] for p in prompts}) == 6
    images = build(WorkloadSpec(kind="multimodal", num_requests=4, images_per_request=2, distinct_images=3))
    assert all(len(c.turns[0].images) == 2 and c.chat for c in images)
    assert len({i for c in images for i in c.turns[0].images}) <= 3
    assert build(WorkloadSpec(seed=5, num_requests=3)) == build(WorkloadSpec(seed=5, num_requests=3))


def test_sharegpt_dataset_reading(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "More?"}]},
            {"conversations": [{"from": "gpt", "value": "no human here"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    single = build(WorkloadSpec(num_requests=2, dataset=path))
    assert [t.text for c in single for t in c.turns] == ["Hi", "Hi"] and single[0].system == "Be brief."
    multi = build(WorkloadSpec(kind="multi-turn", num_requests=1, dataset=path))
    assert [t.text for t in multi[0].turns] == ["Hi", "More?"]
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows))
    assert build(WorkloadSpec(num_requests=1, dataset=array))[0].turns[0].text == "Hi"
    for text, message in (("{not json", "not valid JSON"), ('{"conversations": 3}', "conversations"),
                          ('{"conversations": [{"from": "human"}]}', "string"),
                          ('{"conversations": [{"from": "gpt", "value": "x"}]}', "no conversation")):
        path.write_text(text + "\n")
        with pytest.raises(DatasetError, match=message):
            build(WorkloadSpec(num_requests=1, dataset=path))


async def test_request_bodies_for_each_api() -> None:
    png = b"\x89PNG fake"
    chat = Outgoing(Turn(5, text="look"), (("system", "s", ()), ("user", "look", (png,))))
    http = HttpTransport("http://127.0.0.1:1", "m", None, 5.0, Sampling(), 1)
    path, body = http.body(chat)
    assert path == "/v1/chat/completions" and body["max_tokens"] == 5 and body["ignore_eos"] is True
    parts = body["messages"][1]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,") and parts[1]["text"] == "look"
    path, body = http.body(Outgoing(Turn(3, (11, 12))))
    assert path == "/v1/completions" and body["prompt"] == [11, 12]
    grpc_transport = GrpcTransport("127.0.0.1:1", None, 5.0, Sampling(), "<img>")
    message = grpc_transport.message(chat)
    assert message.text == "system: s\nuser: <img>look\nassistant:" and list(message.images) == [png]
    assert message.sampling.max_tokens == 5 and message.sampling.ignore_eos
    await http.close()
    await grpc_transport.close()


def test_plain_progress_bar_without_a_terminal() -> None:
    stream = io.StringIO()
    bar = Progress(20, "rate 1/s", stream=stream, use_tqdm=False)  # the plain bar, as without tqdm
    for _ in range(20):
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].endswith("20/20") and "#" * 30 in lines[-1]
