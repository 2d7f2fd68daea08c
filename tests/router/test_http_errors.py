"""Every HTTP error the router answers, in OpenAI's shape with the right status."""
from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from tests.router.conftest import Cluster, MakeCluster
from tests.router.fakes import DecodeBehaviour
from tests.router.test_http_api import client


async def post(cluster: Cluster, path: str, body: Any = None, content: bytes | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        if content is not None:
            return await http.post(path, content=content, headers={"content-type": "application/json"})
        return await http.post(path, json=body)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.fixture
async def cluster(make_cluster: MakeCluster) -> Cluster:
    return await make_cluster(max_model_len=128, max_request_bytes=4096)


BAD_COMPLETIONS = [
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "at least 1"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"prompt": "x", "n": 0}, "n", "n must be"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "valid number"),
    ({"prompt": "x", "top_p": 2.0}, "top_p", "top_p must be in (0, 1]"),
    ({"prompt": "x", "temperature": -1}, "temperature", "temperature must be >= 0"),
    ({"prompt": "x", "stream": 1}, "stream", "valid boolean"),
    ({"prompt": "x", "stop": [1, 2]}, "stop", "string"),
    ({"prompt": "x", "logprobs": 50}, "logprobs", "logprobs must be <= 20"),
    ({"prompt": 5}, "prompt", "prompt"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [1, 99999]}, "prompt", "outside the vocabulary"),
    ({}, "prompt", "prompt"),
]


@pytest.mark.parametrize(("body", "param", "fragment"), BAD_COMPLETIONS)
async def test_bad_completion_input_is_400(cluster: Cluster, body: dict[str, Any], param: str, fragment: str) -> None:
    error = error_of(await post(cluster, "/v1/completions", body), 400)
    assert error["param"] == param
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -5}, "max_tokens"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHATS)
async def test_bad_chat_input_is_400(cluster: Cluster, body: dict[str, Any], param: str) -> None:
    assert error_of(await post(cluster, "/v1/chat/completions", body), 400)["param"] == param


async def test_malformed_json_and_bad_utf8(cluster: Cluster) -> None:
    error = error_of(await post(cluster, "/v1/completions", content=b'{"prompt": "x",'), 400)
    assert "not valid JSON" in error["message"]
    error = error_of(await post(cluster, "/v1/completions", content=b'{"prompt": "\xff\xfe"}'), 400)
    assert "not valid UTF-8" in error["message"]
    error = error_of(await post(cluster, "/v1/chat/completions", content=b"[1, 2]"), 400)
    assert "JSON object" in error["message"]


async def test_context_length(cluster: Cluster) -> None:
    long_prompt = list(range(1, 129))
    error = error_of(await post(cluster, "/v1/completions", {"prompt": long_prompt}), 400)
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 128 tokens" in error["message"]
    error = error_of(await post(cluster, "/v1/completions", {"prompt": list(range(1, 101)), "max_tokens": 29}), 400)
    assert "you requested 129 tokens (100 in the prompt, 29 in the completion)" in error["message"]
    assert error["param"] == "max_tokens"
    ok = await post(cluster, "/v1/completions", {"prompt": list(range(1, 101)), "max_tokens": 28})
    assert ok.status_code == 200


async def test_unknown_model_is_404(cluster: Cluster) -> None:
    error = error_of(await post(cluster, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404)
    assert error["code"] == "model_not_found" and "gpt-9" in error["message"]
    with pytest.raises(openai.NotFoundError):
        await client(cluster).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


async def test_body_too_large_is_413(cluster: Cluster) -> None:
    error = error_of(await post(cluster, "/v1/completions", {"prompt": "x" * 5000}), 413)
    assert "limit is 4096" in error["message"]


async def test_openai_client_sees_400(cluster: Cluster) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client(cluster).completions.create(model=cluster.model, prompt="x", max_tokens=-3)
    assert "max_tokens" in str(info.value)


async def test_no_healthy_workers_is_503(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=0, expect_decode=0)
    error = error_of(await post(cluster, "/v1/completions", {"prompt": "x"}), 503)
    assert error["code"] == "no_healthy_workers"


async def test_over_the_in_flight_limit_is_429(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(behaviour=DecodeBehaviour(token_delay=0.05), max_concurrent_requests=1,
                                 max_queued_requests=1)
    body = {"prompt": "x", "max_tokens": 10}
    first = asyncio.create_task(post(cluster, "/v1/completions", body))
    await asyncio.sleep(0.1)
    queued = asyncio.create_task(post(cluster, "/v1/completions", body))
    await asyncio.sleep(0.1)
    error = error_of(await post(cluster, "/v1/completions", body), 429)
    assert error["type"] == "rate_limit_error"
    assert (await first).status_code == 200 and (await queued).status_code == 200
    metrics = (await httpx.AsyncClient(base_url=cluster.base_url).get("/metrics")).text
    assert f'epd_router_requests_total{{model="{cluster.model}",status="rejected"}} 1.0' in metrics
    assert f'epd_router_queue_time_seconds_count{{model="{cluster.model}"}} 2.0' in metrics
