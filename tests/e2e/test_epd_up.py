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


def test_ctrl_c_stops_everything(epd_up) -> None:  # noqa: ANN001
    url, proc, log = epd_up
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    log.seek(0)
    assert b"epd-serve stopped" in log.read()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
