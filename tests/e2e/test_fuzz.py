"""Issue 14 acceptance 3: fuzzing the router's HTTP and gRPC APIs on a real cluster
(router, prefill and decode worker processes on the tiny model).

Over 2,000 generated requests (schemathesis from `/openapi.json`; hypothesis-made
malformed JSON bodies, content types and headers; GenerateRequest messages with
out-of-range values; random bytes as serialized messages) must each get a well-formed
success or a 4xx (gRPC: a client-side code), never a 5xx, an INTERNAL or a crash; and
afterwards the cluster still serves greedy output equal to the offline engine's.

The router's context is held at 64 tokens so that requests the fuzzers make valid stay
cheap to serve on two CPU cores. Hypothesis runs derandomized, without a deadline.
"""
from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.local import LocalCluster
from engine import LLM, SamplingParams
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto.auth import CLUSTER_TOKEN_KEY
from tests.e2e.cluster import make_cluster

pytestmark = pytest.mark.timeout(600)
KEY, TOKEN, CONTEXT = "sk-fuzz", "fuzz-cluster-token", 64
AUTH = {"authorization": f"Bearer {KEY}"}
GRPC_AUTH = (("authorization", f"Bearer {KEY}"),)
# gRPC codes that say the client was wrong (or the router was full); anything else is a
# server fault (INTERNAL, UNKNOWN, DATA_LOSS, ...).
CLIENT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED}
SENT: Counter[str] = Counter()  # requests sent, by fuzzer
SERVED: Counter[str] = Counter()  # of those, successes: the fuzzers reach past validation too


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = make_cluster(tmp_path_factory.mktemp("fuzz"), num_prefill=1, num_decode=1, local_prefill_threshold=16,
                         api_keys=(KEY,), cluster_token=TOKEN,
                         router_args=("--max-model-len", str(CONTEXT), "--max-request-bytes", str(1 << 20)))
    with local:
        yield local


@pytest.fixture(scope="module")
def http(cluster: LocalCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.http_url, timeout=60.0) as client:
        yield client


# What uvicorn's httptools parser answers to a request it cannot frame: a 400, in plain
# text, before the request reaches the router's routes.
PARSER_REFUSAL = "Invalid HTTP request received."


def check_http(response: httpx.Response) -> None:
    """A success, or a 4xx; errors of the OpenAI API in OpenAI's shape."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code == 400 and response.text == PARSER_REFUSAL:
        return  # the HTTP parser refused the framing (e.g. chunked over a plain body) before any route
    path = response.request.url.path
    if response.status_code >= 400 and path.startswith("/v1/") and response.status_code not in (404, 405):
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["type"] and error["code"], response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():  # an error event mid-stream is a failure too
            assert not line.startswith("data: {\"error\""), line


# -- HTTP: schemathesis from the router's own OpenAPI document ---------------------------


def test_http_schema_fuzz(cluster: LocalCluster) -> None:
    import schemathesis
    from schemathesis import GenerationMode
    schema = schemathesis.openapi.from_url(f"{cluster.http_url}/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))

    @fuzz_settings(350)
    @given(case=cases)
    def fuzz(case: Any) -> None:
        SENT["schemathesis"] += 1
        response = case.call(base_url=cluster.http_url, headers=AUTH, timeout=60)
        assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:500])
        SERVED["schemathesis"] += response.status_code == 200 and case.method == "POST"

    fuzz()


# -- HTTP: hypothesis-made malformed bodies ----------------------------------------------


class Raw:
    """JSON text put into a body as is: what `json.dumps` would never write."""

    def __init__(self, text: str) -> None:
        self.text = text


RAW_VALUES = [Raw(t) for t in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-400", "9" * 5000,
                                "-" + "9" * 400, "1" + "0" * 30, '"\\ud800"', '"a\\udfffb"', '"\\u0000"',
                                "4.9e-324", "0.0000000000000000000001", "18446744073709551616", "-0")]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "n", "seed", "stop", "stop_token_ids", "logprobs", "top_logprobs", "repetition_penalty",
          "frequency_penalty", "presence_penalty", "stream", "stream_options", "ignore_eos",
          "skip_special_tokens", "echo", "add_generation_prompt", "chat_template_kwargs", "user"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12),
                    st.sampled_from(RAW_VALUES), st.integers(-3, 3), st.floats(-3, 3))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(FIELDS + ["role", "content", "type",
                                                                                      "text", "image_url", "url"]),
                                                           st.text(max_size=6)), inner, max_size=4)), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"])},
                                          optional={"content": values, "name": values}), max_size=3)
# Values a field may well take: a body near a valid one reaches past validation.
PLAUSIBLE = {"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 20),
             "min_p": st.floats(0, 1), "max_tokens": st.integers(1, 8), "n": st.integers(1, 3),
             "seed": st.integers(-(2**63), 2**64), "stream": st.booleans(), "stop": st.text(min_size=1, max_size=3),
             "repetition_penalty": st.floats(0.1, 3), "frequency_penalty": st.floats(-2, 2),
             "presence_penalty": st.floats(-2, 2), "ignore_eos": st.booleans(), "user": st.text(max_size=8),
             "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
BASES = {"/v1/completions": {"prompt": [5, 6, 7], "max_tokens": 3},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}


def render(value: Any) -> str:
    """JSON text of `value`, with Raw pieces left as written (and NaN/inf as Python's
    json writes them)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value)


@st.composite
def json_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A body near a valid one: a valid base with some fields replaced or added."""
    path = draw(st.sampled_from(sorted(BASES)))
    body: dict[str, Any] = dict(BASES[path]) if draw(st.integers(0, 3)) > 0 else {}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        if name == "messages" and draw(st.booleans()):
            body[name] = draw(messages)
        else:
            body[name] = draw(st.one_of(PLAUSIBLE.get(name, values), values))
    if draw(st.booleans()):
        body.update(draw(st.dictionaries(st.text(max_size=8), values, max_size=2)))  # unknown fields
    return path, render(body).encode("utf-8", "surrogatepass")


@st.composite
def broken_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """Bodies that are not one JSON object at all."""
    path = draw(st.sampled_from(sorted(BASES)))
    depth = draw(st.integers(1, 100_000))
    valid = render(BASES[path]).encode()
    body = draw(st.one_of(
        st.binary(max_size=64), st.just(b""), st.just(b"[" * depth + b"]" * depth),
        st.just(b'{"prompt":' + b"[" * depth + b"]" * depth + b"}"), st.just(b'{"a":' * depth + b"1" + b"}" * depth),
        st.just(valid[: draw(st.integers(0, len(valid) - 1))]), st.just(valid + b"garbage"),
        st.sampled_from([b"null", b"[]", b'"x"', b"1", b"true", b"\xff\xfe{}", b'{"prompt": "\xc3\x28"}',
                         b'\xef\xbb\xbf{"prompt": "x"}', b'{"prompt": "x", "prompt": [1]}', b"{" * 3])))
    return path, body


header_values = st.text(st.characters(max_codepoint=255, blacklist_categories=("Cc",)), max_size=40).map(
    lambda s: s.strip().encode("latin-1"))
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                 "application/json; charset=latin-1", "", "*/*", "application/octet-stream"]


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, Any]]:
    path, body = draw(st.one_of(json_bodies(), json_bodies(), broken_bodies()))
    headers: dict[str, Any] = dict(AUTH, **{"content-type": draw(st.sampled_from(CONTENT_TYPES))})
    if draw(st.integers(0, 9)) == 0:
        headers.update(draw(st.sampled_from([{"content-encoding": "gzip"}, {"transfer-encoding": "chunked"},
                                             {"authorization": draw(header_values)}])))
    method = draw(st.sampled_from(["POST"] * 8 + ["GET", "PUT"]))
    return method, path, body, headers


def test_http_malformed_bodies(http: httpx.Client) -> None:
    @fuzz_settings(900)
    @given(request=http_requests())
    def fuzz(request: tuple[str, str, bytes, dict[str, Any]]) -> None:
        method, path, body, headers = request
        SENT["http-malformed"] += 1
        try:
            response = http.request(method, path, content=body, headers=headers)
        except httpx.RemoteProtocolError:  # e.g. a chunked header over a plain body: the connection is dropped
            return
        check_http(response)
        SERVED["http-malformed"] += response.status_code == 200

    fuzz()


# -- gRPC: GenerateRequest messages with out-of-range values -----------------------------

any_float = st.floats(width=64)
# A valid 1x1 PNG (the text model has no image placeholder: the router must refuse it cleanly).
TINY_PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                         "0000000d49444154789c63f8cfc0f01f0005000201e2b1d8c70000000049454e44ae426082")
uint32 = st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 80))


def near(low: float, high: float) -> st.SearchStrategy[float]:
    """Mostly in [low, high] (a request that gets served), else any double at all."""
    extremes = st.sampled_from([5e-324, 1e-300, 1e-5, 1e300, -0.0, float("nan"), float("inf"), float("-inf")])
    return st.one_of(st.floats(low, high), st.floats(low, high), extremes, any_float)


SAMPLING_FIELDS = {
    "max_tokens": st.one_of(st.integers(1, 12), uint32), "temperature": near(0.0, 2.0),
    "top_k": st.one_of(st.integers(0, 40), uint32), "top_p": near(0.01, 1.0), "min_p": near(0.0, 1.0),
    "repetition_penalty": near(0.01, 3.0), "frequency_penalty": near(-2.0, 2.0),
    "presence_penalty": near(-2.0, 2.0), "seed": st.integers(-(2**63), 2**63 - 1),
    "logprobs": st.one_of(st.integers(0, 5), uint32), "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans()}


@st.composite
def sampling(draw: st.DrawFn) -> pb.SamplingParams:
    message = pb.SamplingParams(max_tokens=draw(st.integers(1, 8)))
    for name in draw(st.lists(st.sampled_from(sorted(SAMPLING_FIELDS)), max_size=5, unique=True)):
        setattr(message, name, draw(SAMPLING_FIELDS[name]))
    if draw(st.integers(0, 3)) == 0:
        message.stop.extend(draw(st.lists(st.text(max_size=4), max_size=3)))
        message.stop_token_ids.extend(draw(st.lists(uint32, max_size=3)))
    return message


utf8_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=draw(sampling()), request_id=draw(st.one_of(st.just(""), utf8_text)))
    if draw(st.integers(0, 7)) == 0:
        request.model = draw(st.sampled_from(["nope", "", "\u0000"]))
    kind = draw(st.sampled_from(["text", "token_ids", "token_ids", "token_ids", "none"]))
    valid_first = draw(st.integers(0, 3)) > 0  # mostly a prompt the model can take
    if kind == "text":
        request.text = draw(st.text(min_size=1, max_size=40) if valid_first else utf8_text)
    elif kind == "token_ids":
        ids = st.integers(3, 255) if valid_first else st.one_of(st.integers(0, 600), uint32)
        request.token_ids.ids.extend(draw(st.lists(ids, min_size=int(valid_first), max_size=80)))
    if draw(st.integers(0, 4)) == 0:
        request.images.extend(draw(st.lists(st.one_of(st.binary(max_size=64), st.just(TINY_PNG)), max_size=2)))
    return request


async def generate_code(channel: grpc.aio.Channel, request: pb.GenerateRequest) -> grpc.StatusCode:
    try:
        async for response in pb_grpc.RouterStub(channel).Generate(request, metadata=GRPC_AUTH, timeout=60.0):
            if response.HasField("finished"):
                assert response.finished.reason != pb.FINISH_REASON_ERROR, response.finished.error
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_grpc_generate_fuzz(cluster: LocalCluster) -> None:
    loop = asyncio.new_event_loop()
    channel = loop.run_until_complete(_open(cluster.grpc_address))

    @fuzz_settings(500)
    @given(request=generate_requests())
    def fuzz(request: pb.GenerateRequest) -> None:
        SENT["grpc-generate"] += 1
        code = loop.run_until_complete(generate_code(channel, request))
        assert code in CLIENT_CODES, (code, request)
        SERVED["grpc-generate"] += code == grpc.StatusCode.OK

    try:
        fuzz()
    finally:
        loop.run_until_complete(channel.close())
        loop.close()


async def _open(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


# -- gRPC: random bytes as serialized request bodies -------------------------------------

METHODS = {"/epd.v1.Router/Generate": True, "/epd.v1.Router/Abort": False, "/epd.v1.Router/Health": False,
           "/epd.v1.Router/ListModels": False, "/epd.v1.Router/ClusterStatus": False,
           "/epd.v1.Registry/Register": False, "/epd.v1.Registry/Heartbeat": False}


async def raw_code(channel: grpc.aio.Channel, method: str, body: bytes) -> grpc.StatusCode:
    metadata = (*GRPC_AUTH, (CLUSTER_TOKEN_KEY, TOKEN))
    try:
        if METHODS[method]:
            async for _ in channel.unary_stream(method)(body, metadata=metadata, timeout=60.0):
                pass
        else:
            await channel.unary_unary(method)(body, metadata=metadata, timeout=60.0)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_grpc_raw_bytes_fuzz(cluster: LocalCluster) -> None:
    loop = asyncio.new_event_loop()
    channel = loop.run_until_complete(_open(cluster.grpc_address))
    bodies = st.one_of(st.binary(max_size=200), generate_requests().map(lambda r: r.SerializeToString()).flatmap(
        lambda raw: st.integers(0, len(raw)).map(lambda cut: raw[:cut])))  # truncated real messages

    @fuzz_settings(400)
    @given(method=st.sampled_from(sorted(METHODS)), body=bodies)
    def fuzz(method: str, body: bytes) -> None:
        SENT["grpc-raw"] += 1
        code = loop.run_until_complete(raw_code(channel, method, body))
        assert code in CLIENT_CODES, (code, method, body)
        SERVED["grpc-raw"] += code == grpc.StatusCode.OK

    try:
        fuzz()
    finally:
        loop.run_until_complete(channel.close())
        loop.close()


# -- afterwards --------------------------------------------------------------------------


def test_cluster_serves_correctly_after_fuzzing(cluster: LocalCluster, http: httpx.Client,
                                                tiny_model_path: Path) -> None:
    print(f"fuzzed: sent {dict(SENT)}, served {dict(SERVED)}")
    assert sum(SENT.values()) >= 2000, SENT
    assert all(SERVED[name] >= SENT[name] // 20 for name in SENT), (SENT, SERVED)
    assert all(proc.poll() is None for proc in cluster.processes.values()), "a process died"
    prompts = [[5, 17, 99, 3, 250, 41, 7, 8], list(range(20, 50))]
    llm = LLM(tiny_model_path)
    expected = [r.outputs[0].text for r in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))]
    got = []
    for prompt in prompts:
        response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0},
                             headers=AUTH)
        assert response.status_code == 200, response.text
        got.append(response.json()["choices"][0]["text"])
    assert got == expected
