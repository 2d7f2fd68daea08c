"""One streamed request to the router, timed: over HTTP (the OpenAI API, SSE) or gRPC
(`epd.v1.Router/Generate`).

A request's timing is the time it was sent and the arrival time of every streamed chunk
that carried tokens. Over gRPC each chunk says how many tokens it carries; over HTTP a
chunk counts as one token for inter-token gaps, and the final usage chunk gives the
output token count.
"""
from __future__ import annotations

import abc
import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bench.client.workloads import Turn

ChatMessage = tuple[str, str, tuple[bytes, ...]]  # role, text, images (PNG bytes, before the text)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    ignore_eos: bool = True  # exact output lengths: a benchmark's token counts must not depend on EOS


@dataclass
class RequestTiming:
    """What one request measured. Times are `time.perf_counter()` seconds."""

    start: float
    scheduled: float | None = None  # open loop: when the arrival process wanted it sent
    token_times: list[float] = field(default_factory=list)  # one per token (a chunk's tokens share its time)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None
    text: str = ""  # the reply (a multi-turn conversation's history)
    conversation: int = 0
    turn: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.start

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None for a one-token reply."""
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def add_chunk(self, tokens: int, text: str = "") -> None:
        now = time.perf_counter()
        self.token_times.extend([now] * max(tokens, 1))
        self.text += text


@dataclass(frozen=True)
class Outgoing:
    """A request ready to send: token ids, or chat messages."""

    turn: Turn
    messages: tuple[ChatMessage, ...] = ()

    @property
    def output_len(self) -> int:
        return self.turn.output_len


class Transport(abc.ABC):
    @abc.abstractmethod
    async def send(self, request: Outgoing, timing: RequestTiming) -> None:
        """Send and stream `request`, filling `timing`; failures go to `timing.error`."""

    async def close(self) -> None:
        """Release connections."""


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class HttpTransport(Transport):
    """POST /v1/completions (token ids) or /v1/chat/completions (messages), streamed."""

    def __init__(self, url: str, model: str | None, api_key: str | None, timeout_s: float,
                 sampling: Sampling, max_connections: int) -> None:
        import httpx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, limits=limits,
                                         timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.model = model
        self.sampling = sampling

    async def resolve_model(self) -> str:
        """The served model's name from GET /v1/models (when --model was not given)."""
        if self.model is None:
            response = await self._client.get("/v1/models")
            response.raise_for_status()
            self.model = str(response.json()["data"][0]["id"])
        return self.model

    def body(self, request: Outgoing) -> tuple[str, dict[str, Any]]:
        common: dict[str, Any] = {"model": self.model, "max_tokens": request.output_len, "stream": True,
                                  "stream_options": {"include_usage": True},
                                  "temperature": self.sampling.temperature, "ignore_eos": self.sampling.ignore_eos}
        if request.turn.token_ids:
            return "/v1/completions", {**common, "prompt": list(request.turn.token_ids)}
        messages = [{"role": role, "content": _content(text, images)} for role, text, images in request.messages]
        return "/v1/chat/completions", {**common, "messages": messages}

    async def send(self, request: Outgoing, timing: RequestTiming) -> None:
        import httpx
        path, body = self.body(request)
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    timing.error = f"HTTP {response.status_code}: {_error_message(await response.aread())}"
                    return
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and _on_event(line[6:], timing):
                        return
        except httpx.HTTPError as exc:
            timing.error = f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        await self._client.aclose()


def _content(text: str, images: tuple[bytes, ...]) -> str | list[dict[str, Any]]:
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return [*parts, {"type": "text", "text": text}]


def _on_event(data: str, timing: RequestTiming) -> bool:
    """Apply one SSE event; True at the end of the stream."""
    if data.strip() == "[DONE]":
        return True
    event = json.loads(data)
    if "error" in event:
        timing.error = str(event["error"].get("message", event["error"]))
        return True
    for choice in event.get("choices") or ():
        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
        if text:
            timing.add_chunk(1, text)
    usage = event.get("usage")
    if usage:
        timing.output_tokens = int(usage["completion_tokens"])
        timing.prompt_tokens = int(usage["prompt_tokens"])
    return False


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


class GrpcTransport(Transport):
    """Router.Generate with token ids, or the messages joined into a text prompt."""

    def __init__(self, address: str, api_key: str | None, timeout_s: float, sampling: Sampling,
                 image_token: str = "<image>") -> None:
        import grpc

        from proto import epd_pb2_grpc as pb_grpc
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 256 << 20)]
        self._channel = grpc.aio.insecure_channel(address, options=options)
        self._stub = pb_grpc.RouterStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s
        self.sampling = sampling
        self.image_token = image_token

    def message(self, request: Outgoing) -> Any:
        from proto import epd_pb2 as pb
        sampling = pb.SamplingParams(max_tokens=request.output_len, temperature=self.sampling.temperature,
                                     ignore_eos=self.sampling.ignore_eos)
        message = pb.GenerateRequest(sampling=sampling)
        if request.turn.token_ids:
            message.token_ids.ids.extend(request.turn.token_ids)
            message.images.extend(request.turn.images)
            return message
        lines = [f"{role}: {self.image_token * len(images)}{text}" for role, text, images in request.messages]
        message.text = "\n".join([*lines, "assistant:"])
        message.images.extend(image for _, _, images in request.messages for image in images)
        return message

    async def send(self, request: Outgoing, timing: RequestTiming) -> None:
        import grpc

        from proto import epd_pb2 as pb
        try:
            call = self._stub.Generate(self.message(request), timeout=self.timeout_s, metadata=self._metadata)
            async for response in call:
                if response.HasField("chunk") and response.chunk.token_ids:
                    timing.add_chunk(len(response.chunk.token_ids), response.chunk.text)
                elif response.HasField("chunk"):
                    timing.text += response.chunk.text  # held-back text released at the end
                elif response.HasField("finished"):
                    timing.output_tokens = response.finished.usage.completion_tokens
                    timing.prompt_tokens = response.finished.usage.prompt_tokens
                    if response.finished.reason == pb.FINISH_REASON_ERROR:
                        timing.error = response.finished.error or "the request failed"
        except grpc.aio.AioRpcError as exc:
            timing.error = f"{exc.code().name}: {exc.details()}"
        except asyncio.TimeoutError:
            timing.error = f"timed out after {self.timeout_s:g} s"

    async def close(self) -> None:
        await self._channel.close()
