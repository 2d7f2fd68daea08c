"""The router's multiplexed decode stream (router/decode_mux.py) in front of fake decode
workers: one stream per worker carries every request, a worker without the method gets
Generate calls (the requests caught by its refusal included), the stream comes back
after the worker restarts, and --no-decode-multiplex sends Generate calls only."""
from __future__ import annotations

import argparse
import asyncio

from router.config import add_router_arguments, config_from_args
from tests.router.conftest import MakeCluster, wait_until
from tests.router.test_http_errors import post


async def _completions(cluster, n: int, max_tokens: int = 5) -> list[dict]:  # noqa: ANN001
    responses = await asyncio.gather(*(post(cluster, "/v1/completions", {"prompt": f"x{i}", "max_tokens": max_tokens})
                                       for i in range(n)))
    assert [r.status_code for r in responses] == [200] * n
    return [r.json() for r in responses]


async def test_every_request_to_a_worker_shares_one_stream(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=2, policy="round_robin")
    bodies = await _completions(cluster, 12)
    assert all(b["usage"]["completion_tokens"] == 5 for b in bodies)
    texts = {b["choices"][0]["text"] for b in bodies}
    assert len(texts) == 1 and texts != {""}  # every request got the whole script
    assert [len(d.requests) for d in cluster.decodes] == [6, 6]
    assert [d.streams_opened for d in cluster.decodes] == [1, 1]
    for decode in cluster.decodes:
        mux = cluster.app.registry.get(decode.worker_id).mux
        assert mux is not None and mux.supported and mux.live_requests == 0


async def test_a_worker_without_the_stream_method_gets_generate_calls(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=1, wait_ready=False)
    old = cluster.decodes[0]
    old.multiplex = False  # refuses Stream with UNIMPLEMENTED, as a worker that predates it
    await wait_until(cluster.app.registry.ready)
    bodies = await _completions(cluster, 4)  # started on the stream together, refused together
    assert all(b["usage"]["completion_tokens"] == 5 for b in bodies)
    assert len(old.requests) == 4 and old.streams_opened == 1
    assert not cluster.app.registry.get("d0").mux.supported
    await _completions(cluster, 2)
    assert len(old.requests) == 6 and old.streams_opened == 1  # no new attempt at a stream


async def test_the_stream_is_opened_again_after_the_worker_restarts(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=1)
    decode = cluster.decodes[0]
    await _completions(cluster, 2)
    assert decode.streams_opened == 1
    await decode.stop()
    await wait_until(lambda: not cluster.app.registry.healthy("decode"))
    await decode.start()  # same port
    await wait_until(cluster.app.registry.ready)
    await _completions(cluster, 3)
    assert decode.streams_opened == 2 and len(decode.requests) == 5


async def test_no_decode_multiplex_sends_one_generate_call_per_request(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=1, decode_multiplex=False)
    await _completions(cluster, 3)
    assert cluster.app.registry.get("d0").mux is None
    assert cluster.decodes[0].streams_opened == 0 and len(cluster.decodes[0].requests) == 3


def test_the_flag() -> None:
    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    assert config_from_args(parser.parse_args([])).decode_multiplex is True
    assert config_from_args(parser.parse_args(["--no-decode-multiplex"])).decode_multiplex is False
