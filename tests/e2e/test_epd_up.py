"""`epd up` as a user runs it: a subprocess, the official openai client, Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from engine import LLM, SamplingParams
from worker.config import free_port

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def epd_up(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    port, grpc_port = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("up") / "epd-up.log", "w+b")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "up", "--port", str(port),
                             "--grpc-port", str(grpc_port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        log.seek(0)
        if b"epd-serve is up" in log.read():
            break
        assert proc.poll() is None, f"epd up exited early:\n{log.read().decode()}"
        time.sleep(0.25)
    else:
        proc.kill()
        pytest.fail("epd up did not become ready")
    yield f"http://127.0.0.1:{port}", proc, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_health_and_endpoints_printed(epd_up) -> None:  # noqa: ANN001
    url, _, log = epd_up
    log.seek(0)
    printed = log.read().decode()
    assert f"{url}/v1" in printed and "gRPC" in printed
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_openai_client_chat_and_completions(epd_up, tiny_model_path) -> None:  # noqa: ANN001
    url, _, _ = epd_up
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    llm = LLM(tiny_model_path)
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "Tell me about the capital of France, in detail please."}]
    chat_ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    expected_chat = llm.generate(chat_ids, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]

    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    assert chat.choices[0].message.content == expected_chat.text
    assert chat.usage.prompt_tokens == len(chat_ids)
    assert chat.usage.completion_tokens == len(expected_chat.token_ids)

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected_chat.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(expected_chat.token_ids)

    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert completion.choices[0].text == expected.text
    assert completion.usage.completion_tokens == len(expected.token_ids)
    parts = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                      stream_options={"include_usage": True})
    chunks = list(parts)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


BAD_HTTP = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b'{"model": MODEL, "prompt": 5, "max_tokens": 4}', 400),
    ("/v1/completions", b'{"model": MODEL, "prompt": "hi", "max_tokens": "four"}', 400),
    ("/v1/completions", b'{"model": "no-such-model", "prompt": "hi"}', 404),
    ("/v1/completions", b'{"model": MODEL, "prompt": "hi", "max_tokens": -1}', 400),
    ("/v1/completions", b'{"model": MODEL, "prompt": "hi", "n": 0}', 400),
    ("/v1/completions", b'{"model": MODEL, "prompt": "\xff\xfe", "max_tokens": 2}', 400),
    ("/v1/completions", b'{"model": MODEL, "prompt": LONG, "max_tokens": 4}', 400),
    ("/v1/chat/completions", b'{"model": MODEL, "messages": "hello"}', 400),
]


def test_bad_input_gets_4xx_and_cluster_keeps_serving(epd_up) -> None:  # noqa: ANN001
    import grpc

    from proto import epd_pb2 as pb
    from proto import epd_pb2_grpc as pb_grpc
    url, _, log = epd_up
    model = httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
    long_prompt = str(list(range(3, 1100)))
    for path, body, status in BAD_HTTP:
        body = body.replace(b"MODEL", f'"{model}"'.encode()).replace(b"LONG", long_prompt.encode())
        response = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=10)
        assert response.status_code == status, (body[:60], response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text
    log.seek(0)
    grpc_port = int(log.read().decode().split("gRPC:")[1].split()[0].rsplit(":", 1)[1])
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.RouterStub(channel)
        bad = [pb.GenerateRequest(text="", sampling=pb.SamplingParams(max_tokens=4)),
               pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=0)),
               pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=1.5)),
               pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(3, 1100))))]
        for request in bad:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request, timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details()
        good = list(stub.Generate(pb.GenerateRequest(text="still serving", sampling=pb.SamplingParams(
            max_tokens=3, ignore_eos=True)), timeout=30))
        assert sum(len(r.chunk.token_ids) for r in good if r.HasField("chunk")) == 3
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert client.completions.create(model=model, prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_ctrl_c_stops_everything(epd_up) -> None:  # noqa: ANN001
    url, proc, log = epd_up
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    log.seek(0)
    assert b"epd-serve stopped" in log.read()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
