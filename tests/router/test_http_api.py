"""The OpenAI HTTP API end to end: the official client against the router in front of
a fake decode worker."""
from __future__ import annotations

import json
from threading import main_thread

import httpx
import pytest
from openai import AsyncOpenAI

from tests.router.conftest import Cluster, MakeCluster, encode_threads
from tests.router.fakes import SCRIPT_TEXT, DecodeBehaviour

CHAT = [{"role": "user", "content": "Tell me a story"}]


def client(cluster: Cluster) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0)


def script_text(cluster: Cluster, script: list[int], count: int) -> str:
    return cluster.tokenizer.decode([script[i % len(script)] for i in range(count)])


async def test_chat_completion(make_cluster: MakeCluster, script: list[int]) -> None:
    cluster = await make_cluster(behaviour=DecodeBehaviour(cached_tokens=3))
    response = await client(cluster).chat.completions.create(model=cluster.model, messages=CHAT, max_tokens=10)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == script_text(cluster, script, 10)
    assert choice.finish_reason == "length"
    tok = cluster.tokenizer
    prompt = tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
    assert list(cluster.decodes[0].requests[0].prompt_token_ids) == prompt
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == 10
    assert response.usage.total_tokens == len(prompt) + 10
    assert response.usage.prompt_tokens_details.cached_tokens == 3


async def test_chat_stream_with_usage(make_cluster: MakeCluster, script: list[int]) -> None:
    cluster = await make_cluster()
    stream = await client(cluster).chat.completions.create(
        model=cluster.model, messages=CHAT, max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == script_text(cluster, script, 12)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


async def test_completion_prompt_forms(make_cluster: MakeCluster, script: list[int]) -> None:
    cluster = await make_cluster()
    api = client(cluster)
    text = await api.completions.create(model=cluster.model, prompt="Hello", max_tokens=4)
    assert text.choices[0].text == script_text(cluster, script, 4)
    assert text.usage.prompt_tokens == len(cluster.tokenizer.encode("Hello"))
    ids = await api.completions.create(model=cluster.model, prompt=[5, 6, 7], max_tokens=3)
    assert list(cluster.decodes[0].requests[-1].prompt_token_ids) == [5, 6, 7]
    assert ids.usage.prompt_tokens == 3
    many = await api.completions.create(model=cluster.model, prompt=["a", "bb"], max_tokens=2, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    prompt_tokens = len(cluster.tokenizer.encode("a")) + len(cluster.tokenizer.encode("bb"))
    assert many.usage.prompt_tokens == prompt_tokens and many.usage.completion_tokens == 8


async def test_completion_default_max_tokens_is_16(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    response = await client(cluster).completions.create(model=cluster.model, prompt="Hi")
    assert response.usage.completion_tokens == 16


async def test_chat_default_max_tokens_fills_context(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(max_model_len=64)
    response = await client(cluster).chat.completions.create(model=cluster.model, messages=CHAT)
    assert response.usage.prompt_tokens + response.usage.completion_tokens == 64


async def test_n_fans_out_with_seed_offsets(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    response = await client(cluster).chat.completions.create(
        model=cluster.model, messages=CHAT, max_tokens=3, n=3, seed=7, temperature=0.5)
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    requests = cluster.decodes[0].requests
    assert sorted(r.sampling.seed for r in requests) == [7, 8, 9]
    assert len({r.request_id for r in requests}) == 3
    assert response.usage.completion_tokens == 9
    assert response.usage.prompt_tokens == len(requests[0].prompt_token_ids)


async def test_sampling_fields_reach_the_worker(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    await client(cluster).completions.create(
        model=cluster.model, prompt="x", max_tokens=2, temperature=0.3, top_p=0.9, stop=["zz", "yy"],
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "ignore_eos": True})
    sampling = cluster.decodes[0].requests[0].sampling
    assert sampling.max_tokens == 2 and sampling.top_k == 5 and sampling.ignore_eos
    assert sampling.temperature == pytest.approx(0.3) and sampling.top_p == pytest.approx(0.9)
    assert sampling.min_p == pytest.approx(0.1) and sampling.repetition_penalty == pytest.approx(1.2)
    assert list(sampling.stop) == ["zz", "yy"]


async def test_stop_string_truncates_text(make_cluster: MakeCluster, script: list[int]) -> None:
    cluster = await make_cluster()
    api = client(cluster)
    full = await api.completions.create(model=cluster.model, prompt="x", max_tokens=30, stop="brown")
    assert full.choices[0].text == SCRIPT_TEXT[:SCRIPT_TEXT.index("brown")]
    assert full.choices[0].finish_reason == "stop"
    stream = await api.completions.create(model=cluster.model, prompt="x", max_tokens=30, stop=["fox"], stream=True)
    pieces = [c.choices[0].text async for c in stream if c.choices]
    assert "".join(pieces) == SCRIPT_TEXT[:SCRIPT_TEXT.index("fox")]
    assert all("fox" not in p and "fo" != p[-2:] for p in pieces)


async def test_stop_token_finishes_with_stop(make_cluster: MakeCluster, script: list[int]) -> None:
    cluster = await make_cluster(behaviour=DecodeBehaviour(eos_at=4, eos_id=511))
    response = await client(cluster).completions.create(model=cluster.model, prompt="x", max_tokens=30)
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].stop_reason == 511
    assert response.choices[0].text == script_text(cluster, script, 4)
    assert response.usage.completion_tokens == 5


async def test_chat_logprobs(make_cluster: MakeCluster, script: list[int]) -> None:
    cluster = await make_cluster()
    response = await client(cluster).chat.completions.create(
        model=cluster.model, messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=2)
    assert cluster.decodes[0].requests[0].sampling.logprobs == 2
    content = response.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2
    assert content[0].token == cluster.tokenizer.decode([script[0]])
    assert content[0].logprob == pytest.approx(-0.25)


async def test_completion_logprobs(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    response = await client(cluster).completions.create(model=cluster.model, prompt="x", max_tokens=3, logprobs=1)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == 3 and logprobs.token_logprobs == [-0.25] * 3
    assert all(len(top) == 1 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


async def test_sse_wire_format(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    body = {"model": cluster.model, "prompt": "x", "max_tokens": 3, "stream": True}
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = b"".join([part async for part in response.aiter_bytes()]).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


async def test_models_health_cluster_metrics(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(prefill=1)
    cluster.prefills[0].fields.kv_bytes_sent_total = 4096
    cluster.prefills[0].fields.prefix_hit_tokens_total = 77
    models = await client(cluster).models.list()
    assert [m.id for m in models.data] == [cluster.model]
    await client(cluster).completions.create(model=cluster.model, prompt="x", max_tokens=2)
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        assert (await http.get("/health")).status_code == 200
        await cluster.app.monitor.poll(cluster.app.registry.get("p0"))
        workers = (await http.get("/cluster")).json()
        metrics = (await http.get("/metrics")).text
    by_id = {w["id"]: w for w in workers}
    assert set(by_id) == {"d0", "p0"}
    assert by_id["p0"]["role"] == "prefill" and by_id["p0"]["healthy"] is True
    assert by_id["p0"]["kv_bytes_sent_total"] == 4096 and by_id["d0"]["kv_pages_total"] == 1000
    expected = {"role", "id", "address", "healthy", "kv_pages_total", "kv_pages_free", "running", "waiting",
                "prefill_tokens_total", "kv_bytes_sent_total", "kv_bytes_received_total", "requests_total"}
    assert expected <= set(by_id["d0"])
    model = cluster.model
    assert f'epd_router_requests_total{{model="{model}",status="ok"}} 1.0' in metrics
    assert f'epd_router_time_to_first_token_seconds_count{{model="{model}"}} 1.0' in metrics
    assert f'epd_router_worker_kv_bytes_sent_total{{model="{model}",pool="prefill",worker="p0"}} 4096.0' in metrics
    assert f'epd_router_worker_prefix_hit_tokens_total{{model="{model}",pool="prefill",worker="p0"}} 77.0' in metrics
    assert f'epd_router_worker_routed_requests_total{{model="{model}",pool="decode",worker="d0"}} 1.0' in metrics
    for name in ("inter_token_latency_seconds", "e2e_request_latency_seconds", "queue_time_seconds",
                 "prompt_tokens_total", "generation_tokens_total", "prefix_cache_hit_tokens_total"):
        assert f"epd_router_{name}" in metrics


async def test_health_503_until_workers_ready(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(wait_ready=False, expect_decode=2)
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        response = await http.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "not ready"


async def test_prefill_candidates_passed_in_order(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(prefill=2)
    cluster.prefills[0].fields.queued_prefill_tokens = 5000
    for handle in cluster.app.registry.handles("prefill"):
        await cluster.app.monitor.poll(handle)
    await client(cluster).completions.create(model=cluster.model, prompt="x", max_tokens=2)
    candidates = cluster.decodes[0].requests[0].prefill
    assert [c.id for c in candidates] == ["p1", "p0"]
    assert candidates[0].address == cluster.prefills[1].address


async def test_streaming_n_choices(make_cluster: MakeCluster, script: list[int]) -> None:
    cluster = await make_cluster()
    stream = await client(cluster).chat.completions.create(
        model=cluster.model, messages=CHAT, max_tokens=5, n=2, stream=True, stream_options={"include_usage": True})
    texts = {0: "", 1: ""}
    finishes = {}
    usage = None
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert texts == {0: script_text(cluster, script, 5), 1: script_text(cluster, script, 5)}
    assert finishes == {0: "length", 1: "length"}
    assert usage.completion_tokens == 10


async def test_duplicate_grpc_request_id_is_rejected(make_cluster: MakeCluster) -> None:
    import grpc

    from proto import epd_pb2, epd_pb2_grpc
    cluster = await make_cluster(behaviour=DecodeBehaviour(token_delay=0.05))
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        stub = epd_pb2_grpc.RouterStub(channel)
        request = epd_pb2.GenerateRequest(request_id="same", text="x", sampling=epd_pb2.SamplingParams(max_tokens=20))
        first = stub.Generate(request)
        await first.read()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(request):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        first.cancel()


async def test_large_inputs_are_tokenized_off_the_event_loop(make_cluster: MakeCluster,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = await make_cluster()
    threads = encode_threads(cluster, monkeypatch)
    encode = cluster.tokenizer.encode
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    done = await client(cluster).completions.create(model=cluster.model, prompt=prompt, max_tokens=3)
    assert list(cluster.decodes[0].requests[-1].prompt_token_ids) == encode(prompt)
    assert done.usage.prompt_tokens == len(encode(prompt))
    chat = await client(cluster).chat.completions.create(model=cluster.model, messages=CHAT, max_tokens=2)
    assert chat.choices[0].finish_reason == "length"
    assert len(threads) == 2 and all(t is not main_thread() for t in threads)
    # Errors raised off the loop still come back as the OpenAI error shape.
    async with httpx.AsyncClient(timeout=10) as http:
        bad = await http.post(cluster.base_url + "/v1/completions",
                              json={"model": cluster.model, "prompt": prompt, "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


async def test_http_connections_have_no_nagle_delay(make_cluster: MakeCluster) -> None:
    """Every accepted HTTP connection sets TCP_NODELAY: without it, a keep-alive
    client's streamed chunks wait on its delayed ACK (about 40 ms a request)."""
    import socket
    cluster = await make_cluster()
    body = {"model": cluster.model, "prompt": "x", "max_tokens": 3, "stream": True}
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        for _ in range(2):  # the same keep-alive connection twice
            async with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                _ = [part async for part in response.aiter_bytes()]
        server = cluster.app._http
        assert server is not None and server.server_state.connections
        for connection in server.server_state.connections:
            sock = connection.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_spliced_sse_text_chunks_match_the_rendered_ones(kind: str) -> None:
    """The per-token fast path gives the very bytes of the general path."""
    from router.openai_format import Choice, ResponseFormatter, sse_bytes
    from router.service import TokenDelta
    formatter = ResponseFormatter(kind, 'id-"quoted"', "mödel \\ name", 123, tokenizer=None, logprobs=False)  # type: ignore[arg-type]
    fast, slow = Choice(0), Choice(0)
    for text in ["", "Hello", ' "quoted" \\ back', "ünïcode 你好 🙂", "line\nbreak\t\u0001", ""]:
        delta = TokenDelta([1], text, [])
        expected = b"".join(sse_bytes(c) for c in formatter.stream_chunks(slow, delta))
        assert formatter.stream_bytes(fast, delta) == expected
        assert fast.text_offset == slow.text_offset and fast.started == slow.started
