"""Stub workers for the router benchmark: no model, answers at once.

    python -m bench.router_stubs ours --router HOST:PORT --mode regular|pd --script IDS
    python -m bench.router_stubs sglang --decode-port P [--prefill-port P] --script-text JSON

`ours` serves our worker protocol on real gRPC servers and registers with the router
like a real worker (`worker.registration`): a decode worker whose `Generate` streams
`max_tokens` tokens at once, one message per token (in PD mode the first token comes
from a `Prefill` call to the prefill candidate the router named, as a real decode worker
does), served over `DecodeWorker.Stream` by the decode worker's own code
(`decode_worker/mux.py`: messages batched as they are ready), and a prefill worker that
answers `Prefill` at once. Both report an idle `Status`.

`sglang` serves what sglang-router calls on SGLang workers, over HTTP/1.1 with
keep-alive: `GET /health`, `/health_generate`, `/server_info`, `/get_server_info`,
`/model_info`, `/get_model_info`, `/v1/models`, and `POST /v1/chat/completions` (and
`/generate`), streamed as SSE (one chunked write per event: a role chunk, one chunk per
token, a finish chunk, `[DONE]`) or answered whole. A prefill stub (PD mode) answers at
once, whatever the bootstrap fields say.

Each prints `READY` and its addresses as one JSON line on stdout once serving, and
runs until SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import grpc

from decode_worker.mux import serve_stream
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from worker.registration import register_loop

MODEL = "tiny"


# ---------------------------------------------------------------- our protocol

def _status(role: str, worker_id: str, address: str) -> pb.WorkerStatus:
    return pb.WorkerStatus(role=role, id=worker_id, address=address, kv_pages_total=100000,
                           kv_pages_free=100000, page_size=16, model=MODEL)


class StubDecode(pb_grpc.DecodeWorkerServicer):
    """Streams `max_tokens` tokens cycled from `script`; messages are built once."""

    def __init__(self, worker_id: str, script: Sequence[int]) -> None:
        self.worker_id = worker_id
        self.address = ""
        self._chunks = [pb.DecodeResponse(chunk=pb.TokenChunk(token_ids=[t])) for t in script]
        self._script = list(script)
        self._prefill: dict[str, pb_grpc.PrefillWorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _prefill_stub(self, address: str) -> pb_grpc.PrefillWorkerStub:
        stub = self._prefill.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels.append(channel)
            stub = self._prefill[address] = pb_grpc.PrefillWorkerStub(channel)
        return stub

    async def Generate(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):  # noqa: ANN201
        count = request.sampling.max_tokens
        chunks = self._chunks
        start = 0
        if request.prefill:  # PD: the first token is prefill's, as with a real decode worker
            candidate = request.prefill[0]
            reply = await self._prefill_stub(candidate.address).Prefill(pb.PrefillRequest(
                request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                sampling=request.sampling, destination=pb.KVDestination(room_id=request.request_id)), timeout=10.0)
            yield pb.DecodeResponse(chunk=pb.TokenChunk(token_ids=[reply.first_token]))
            start = 1
        for i in range(start, count):
            yield chunks[i % len(chunks)]
        usage = pb.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=count)
        yield pb.DecodeResponse(finished=pb.Finished(reason=pb.FINISH_REASON_LENGTH, usage=usage))

    async def Stream(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        """The multiplexed form, served by the decode worker's own code (decode_worker/mux.py)
        around this Generate: a request's messages go out in batches with the others'."""
        await serve_stream(self, requests, context)  # type: ignore[arg-type]

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(found=False)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStatus:
        return _status("decode", self.worker_id, self.address)


class StubPrefill(pb_grpc.PrefillWorkerServicer):
    def __init__(self, worker_id: str, first_token: int) -> None:
        self.worker_id = worker_id
        self.address = ""
        self._reply = pb.PrefillResponse(first_token=first_token)

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        return self._reply

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(found=False)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStatus:
        return _status("prefill", self.worker_id, self.address)


async def _grpc_server(servicer: StubDecode | StubPrefill) -> grpc.aio.Server:
    server = grpc.aio.server()
    if isinstance(servicer, StubDecode):
        pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    else:
        pb_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servicer.address = f"127.0.0.1:{port}"
    return server


async def serve_ours(router: str, mode: str, script: list[int], heartbeat_s: float) -> None:
    decode = StubDecode("stub-decode-0", script)
    servers = [await _grpc_server(decode)]
    workers: list[tuple[str, StubDecode | StubPrefill]] = [("decode", decode)]
    if mode == "pd":
        prefill = StubPrefill("stub-prefill-0", script[0])
        servers.append(await _grpc_server(prefill))
        workers.append(("prefill", prefill))
    tasks = [asyncio.create_task(register_loop(router, role, w.worker_id, w.address, heartbeat_s))
             for role, w in workers]
    _ready({role: w.address for role, w in workers})
    await _until_signalled()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*(s.stop(0) for s in servers), *tasks, return_exceptions=True)


# ---------------------------------------------------------------- SGLang's HTTP API

@dataclass(frozen=True)
class SseScript:
    """The bytes a streamed chat completion is made of, one chunked-encoding frame each."""

    role: bytes
    tokens: list[bytes]
    finish: bytes
    done: bytes

    @staticmethod
    def build(texts: Sequence[str]) -> SseScript:
        def frame(body: Any) -> bytes:
            data = b"data: " + (body if isinstance(body, bytes) else json.dumps(body).encode()) + b"\n\n"
            return b"%x\r\n%s\r\n" % (len(data), data)

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {"id": "stub", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        return SseScript(frame(chunk({"role": "assistant", "content": ""}, None)),
                         [frame(chunk({"content": t}, None)) for t in texts],
                         frame(chunk({}, "length")), frame(b"[DONE]") + b"0\r\n\r\n")


_INFO = json.dumps({"model_path": MODEL, "tokenizer_path": MODEL, "served_model_name": MODEL, "is_generation": True,
                    "object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "stub"}]}).encode()


class SglangStubProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a stub SGLang worker."""

    def __init__(self, script: SseScript, prefill: bool) -> None:
        self._script = script
        self._prefill = prefill
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while (request := self._take_request()) is not None:
                self._answer(*request)
        except ValueError as exc:  # not HTTP/1.1 as this stub reads it: say so, hang up
            self._whole(400, json.dumps({"error": f"stub: bad request: {exc}"}).encode())
            assert self._transport is not None
            self._transport.close()

    def _take_request(self) -> tuple[str, str, bytes] | None:
        """The next whole request (method, path, body) in the buffer, removed from it."""
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in head[1:])}
        if "chunked" in headers.get("transfer-encoding", "").lower():
            taken = _dechunk(self._buffer, end + 4)
            if taken is None:
                return None
            body, used = taken
        else:
            length = int(headers.get("content-length", "0"))
            if len(self._buffer) < end + 4 + length:
                return None
            body, used = bytes(self._buffer[end + 4:end + 4 + length]), end + 4 + length
        del self._buffer[:used]
        return method, path.split("?", 1)[0], body

    def _answer(self, method: str, path: str, body: bytes) -> None:
        if method == "GET":
            self._whole(200, b"OK" if path.startswith("/health") else _INFO)
        elif path in ("/v1/chat/completions", "/generate", "/v1/completions"):
            self._generate(json.loads(body))
        else:
            self._whole(404, b'{"error": "not found"}')

    def _whole(self, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
        assert self._transport is not None
        self._transport.write(b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                              % (status, content_type, len(body), body))

    def _generate(self, request: dict[str, Any]) -> None:
        assert self._transport is not None
        count = int(request.get("max_completion_tokens") or request.get("max_tokens") or 16)
        if self._prefill or not request.get("stream"):
            self._whole(200, json.dumps({"id": "stub", "object": "chat.completion", "model": MODEL,
                                         "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                                                      "finish_reason": "length"}]}).encode())
            return
        s, write = self._script, self._transport.write
        write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        write(s.role)
        for i in range(count):
            write(s.tokens[i % len(s.tokens)])
        write(s.finish)
        write(s.done)


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked body starting at `start`: (body, end offset), or None if incomplete."""
    body, position = bytearray(), start
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", line_end)
            return None if trailer_end < 0 else (bytes(body), trailer_end + 4)
        if len(buffer) < line_end + 2 + size + 2:
            return None
        body += buffer[line_end + 2:line_end + 2 + size]
        position = line_end + 2 + size + 2


async def serve_sglang(decode_port: int, prefill_port: int | None, texts: list[str]) -> None:
    loop = asyncio.get_running_loop()
    script = SseScript.build(texts)
    servers = [await loop.create_server(lambda: SglangStubProtocol(script, False), "127.0.0.1", decode_port)]
    ready = {"decode": f"http://127.0.0.1:{decode_port}"}
    if prefill_port is not None:
        servers.append(await loop.create_server(lambda: SglangStubProtocol(script, True), "127.0.0.1", prefill_port))
        ready["prefill"] = f"http://127.0.0.1:{prefill_port}"
    _ready(ready)
    await _until_signalled()
    for server in servers:
        server.close()


# ---------------------------------------------------------------- process

def _ready(addresses: dict[str, str]) -> None:
    print("READY " + json.dumps(addresses), flush=True)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.router_stubs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    ours = sub.add_parser("ours")
    ours.add_argument("--router", required=True, help="the router's gRPC address (Registry service)")
    ours.add_argument("--mode", choices=("regular", "pd"), default="regular")
    ours.add_argument("--script", required=True, help="comma-separated token ids to stream, cycled")
    ours.add_argument("--heartbeat", type=float, default=0.2, help="seconds between registry heartbeats")
    theirs = sub.add_parser("sglang")
    theirs.add_argument("--decode-port", type=int, required=True)
    theirs.add_argument("--prefill-port", type=int, default=None)
    theirs.add_argument("--script-text", required=True, help="JSON list of the tokens' texts, cycled")
    args = parser.parse_args(argv)
    if args.kind == "ours":
        script = [int(t) for t in args.script.split(",") if t]
        if not script:
            parser.error("--script needs at least one token id")
        asyncio.run(serve_ours(args.router, args.mode, script, args.heartbeat))
    else:
        texts = json.loads(args.script_text)
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            parser.error("--script-text must be a JSON list of strings")
        asyncio.run(serve_sglang(args.decode_port, args.prefill_port, texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
