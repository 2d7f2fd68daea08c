"""The router benchmark's processes: each router with its stub workers (a "side"), the
direct path to those stubs, process CPU readings and start-to-ready times."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Sequence

import grpc

from bench.router_client import BenchError, StreamClient, check
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from router.decode_mux import DecodeMux
from worker.config import free_port

if TYPE_CHECKING:
    from bench.router_bench import Workload

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Proc:
    """A child process with its log; `cpu_seconds` is its utime + stime, all threads."""

    class Failed(Exception):
        """A process did not start, or died."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, stdout_pipe: bool = False) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")
        self.popen = subprocess.Popen(list(argv), cwd=ROOT, stdout=subprocess.PIPE if stdout_pipe else self._log,
                                      stderr=self._log, stdin=subprocess.DEVNULL)

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.popen.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)

    async def ready_line(self) -> dict[str, str]:
        """The stub's `READY {addresses}` line."""
        assert self.popen.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(self.popen.stdout.readline), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise Proc.Failed(f"{self.name} did not start in {START_TIMEOUT_S:g} s") from None
        if not line.startswith(b"READY "):
            raise Proc.Failed(f"{self.name} failed to start (exit {self.popen.poll()}): {line!r}")
        return json.loads(line[6:])

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise Proc.Failed(f"{self.name} exited with {self.popen.returncode} (log {self.log_path.name})")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT if self.popen.args[0] == "py-spy" else signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


async def http_status(host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """The status of `GET path`, or None when nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), timeout)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else None
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        return None
    finally:
        writer.close()


class GrpcDirect:
    """Our stubs without the router: each request started on one `DecodeWorker.Stream`,
    as the router sends it (with the prefill candidate in PD mode, so the stub decode
    calls the stub prefill as it does behind the router)."""

    def __init__(self, decode: str, prefill: str | None, workload: Workload) -> None:
        self._channel = grpc.aio.insecure_channel(decode)
        # The protocol the router speaks to them: every request over one DecodeWorker.Stream.
        self._mux = DecodeMux(pb_grpc.DecodeWorkerStub(self._channel), "stub-decode-0")
        self._prefill = [pb.PrefillCandidate(id="stub-prefill-0", address=prefill)] if prefill else []
        self._workload = workload
        self._ids = 0

    async def __call__(self) -> None:
        self._ids += 1
        w = self._workload
        request = pb.DecodeRequest(request_id=f"direct-{self._ids}", prompt_token_ids=w.prompt_ids,
                                   sampling=pb.SamplingParams(max_tokens=w.tokens, temperature=0),
                                   prefill=self._prefill)
        tokens = 0
        call = self._mux.generate(request, 30.0)
        while (response := await call.read()) is not grpc.aio.EOF:
            tokens += len(response.chunk.token_ids)
        if tokens != w.tokens:
            raise BenchError(f"direct call: {tokens} tokens, expected {w.tokens}")

    def close(self) -> None:
        pass  # the channel lives as long as the side

    async def aclose(self) -> None:
        self._mux.close()
        await self._channel.close()


class SglangDirect:
    """SGLang stubs without the router: the request (with bootstrap fields in PD mode)
    to decode, and at the same time to prefill, as sglang-router sends it."""

    def __init__(self, decode: str, prefill: str | None, workload: Workload) -> None:
        body = json.loads(workload.body)
        if prefill:
            body.update(bootstrap_host="127.0.0.1", bootstrap_port=8998, bootstrap_room=1)
        self._decode = StreamClient(decode + "/v1/chat/completions")
        self._prefill = StreamClient(prefill + "/v1/chat/completions") if prefill else None
        self._request = self._decode.request_bytes(json.dumps(body).encode())
        self._expected = workload.expected

    async def __call__(self) -> None:
        if self._prefill is None:
            response = await self._decode.post(self._request, 30.0)
        else:
            response, _ = await asyncio.gather(self._decode.post(self._request, 30.0),
                                               self._prefill.post(self._request, 30.0))
        check(response, self._expected)

    def close(self) -> None:
        self._decode.close()
        if self._prefill is not None:
            self._prefill.close()


class RouterSide:
    """One router process, its stub workers and the direct path to them."""

    def __init__(self, name: str, mode: str, router: Proc, stubs: list[Proc], port: int,
                 addresses: dict[str, str]) -> None:
        self.name = name
        self.label = "ours" if name == "ours" else "sglang-router"
        self.mode = mode
        self.router = router
        self.stubs = stubs
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.port = port
        self.addresses = addresses
        self.ready = (0.0, 0.0)
        self._last_error = ""
        self._grpc_direct: GrpcDirect | None = None

    def direct_caller(self, workload: Workload) -> GrpcDirect | SglangDirect:
        if self.name == "sglang":
            return SglangDirect(self.addresses["decode"], self.addresses.get("prefill"), workload)
        if self._grpc_direct is None:
            self._grpc_direct = GrpcDirect(self.addresses["decode"], self.addresses.get("prefill"), workload)
        return self._grpc_direct

    async def wait_ready(self, started: float, workload: Workload) -> None:
        """Start-to-ready: until /health answers, then until a request is served."""
        deadline = started + START_TIMEOUT_S
        while await http_status("127.0.0.1", self.port, "/health") is None:
            self._check_time(deadline)
            await asyncio.sleep(0.01)
        answered = time.monotonic()
        client = StreamClient(self.url)
        request = client.request_bytes(workload.body)
        try:
            while True:
                self._check_time(deadline, self._last_error)
                try:
                    check(await client.post(request, 10.0), workload.expected)
                    break
                except (BenchError, OSError, asyncio.TimeoutError) as exc:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    client.close()
                    await asyncio.sleep(0.01)
        finally:
            client.close()
        self.ready = (answered - started, time.monotonic() - started)

    def _check_time(self, deadline: float, last_error: str = "") -> None:
        self.router.check_alive()
        if time.monotonic() > deadline:
            raise Proc.Failed(f"{self.label} was not ready within {START_TIMEOUT_S:g} s"
                              + (f" (last answer: {last_error})" if last_error else ""))

    async def aclose(self) -> None:
        if self._grpc_direct is not None:
            await self._grpc_direct.aclose()
        for proc in (self.router, *self.stubs):
            proc.stop()


async def start_side(name: str, mode: str, workload: Workload, policy: str, logs: Path) -> RouterSide:
    port = free_port()
    stubs: list[Proc] = []
    try:
        if name == "ours":
            grpc_port = free_port()
            stubs.append(Proc(f"ours-{mode}-stubs", [sys.executable, "-m", "bench.router_stubs", "ours",
                                                     "--router", f"127.0.0.1:{grpc_port}", "--mode", mode,
                                                     "--script", ",".join(map(str, workload.script_ids))],
                              logs, stdout_pipe=True))
            argv = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
                    "--grpc-port", str(grpc_port), "--policy", policy, "--log-level", "warning",
                    "--served-model-name", "tiny"] + (["--expect-prefill", "1"] if mode == "pd" else [])
        else:
            ports = {"decode": free_port(), "prefill": free_port()}
            stub_argv = [sys.executable, "-m", "bench.router_stubs", "sglang", "--decode-port", str(ports["decode"]),
                         "--script-text", json.dumps(workload.script_texts)]
            stub_argv += ["--prefill-port", str(ports["prefill"])] if mode == "pd" else []
            stubs.append(Proc(f"sglang-{mode}-stubs", stub_argv, logs, stdout_pipe=True))
            argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                    "--policy", policy, "--log-level", "warn",
                    "--prometheus-port", str(free_port())]  # its default port may be taken
            argv += (["--pd-disaggregation", "--prefill", f"http://127.0.0.1:{ports['prefill']}", "8998",
                      "--decode", f"http://127.0.0.1:{ports['decode']}"] if mode == "pd"
                     else ["--worker-urls", f"http://127.0.0.1:{ports['decode']}"])
        addresses = await stubs[0].ready_line()
        started = time.monotonic()
        if name == "ours" and os.environ.get("EPD_ROUTER_PROFILE"):
            argv = ["py-spy", "record", "-r", "250", "-f", "raw", "-o", os.environ["EPD_ROUTER_PROFILE"] + f"-{mode}.txt", "--"] + argv
        router = Proc(f"{name}-{mode}-router", argv, logs)
    except BaseException:
        for proc in stubs:
            proc.stop()
        raise
    side = RouterSide(name, mode, router, stubs, port, addresses)
    try:
        await side.wait_ready(started, workload)
    except BaseException:
        await side.aclose()
        raise
    return side
