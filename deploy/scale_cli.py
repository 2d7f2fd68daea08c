"""`epd scale POOL N --router URL`: set a pool's size through the router's admin API,
then (unless --no-wait) wait until the pool has N ready workers and nothing draining.
`epd down`: stop the cluster `epd up` started (local or Ray)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROLES = ("encode", "prefill", "decode")


def add_commands(sub: argparse._SubParsersAction) -> None:
    scale = sub.add_parser("scale", help="grow or shrink one pool of a running cluster")
    scale.add_argument("pool", help="encode, prefill or decode")
    scale.add_argument("replicas", type=int, help="workers the pool should have")
    scale.add_argument("--router", default="http://127.0.0.1:8000", help="the router's HTTP URL")
    scale.add_argument("--admin-key", default=os.environ.get("EPD_ADMIN_KEY"),
                       help="the router's admin key (default: env EPD_ADMIN_KEY)")
    scale.add_argument("--no-wait", action="store_true", help="return once the change is accepted")
    scale.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the pool")
    scale.set_defaults(handler=_scale)
    drain = sub.add_parser("drain", help="drain one worker: no new requests, wait for the running ones")
    drain.add_argument("--worker", required=True, metavar="HOST:PORT", help="the worker's gRPC address")
    drain.add_argument("--timeout", type=float, default=600.0, help="seconds its running requests may take")
    drain.add_argument("--exit", action="store_true", help="and have the worker exit afterwards")
    drain.set_defaults(handler=_drain)
    down = sub.add_parser("down", help="stop the cluster `epd up` started")
    down.add_argument("--port", type=int, default=8000, help="the router HTTP port it was started with")
    down.add_argument("--timeout", type=float, default=60.0)
    down.set_defaults(handler=_down)


def _fail(message: str, code: int = 2) -> int:
    print(f"epd scale: error: {message}", file=sys.stderr)
    return code


def _scale(args: argparse.Namespace) -> int:
    if args.pool not in ROLES:
        return _fail(f"unknown pool {args.pool!r}; the pools are {', '.join(ROLES)}")
    if args.replicas < 0:
        return _fail(f"the worker count must be >= 0, got {args.replicas}")
    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    url = args.router.rstrip("/")
    try:
        response = httpx.post(f"{url}/admin/pools/{args.pool}", json={"replicas": args.replicas},
                              headers=headers, timeout=60.0)
    except httpx.HTTPError as exc:
        return _fail(f"cannot reach the router at {url}: {exc}")
    if response.status_code != 200:
        return _fail(_message(response))
    body = response.json()
    print(f"{args.pool}: {body['replicas']} worker(s); started {body['started'] or 'none'}, "
          f"draining {body['draining'] or 'none'}", flush=True)
    if args.no_wait:
        return 0
    return _wait(url, headers, args.pool, args.replicas, args.timeout)


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text.strip()}"


def _wait(url: str, headers: dict[str, str], pool: str, replicas: int, timeout_s: float) -> int:
    deadline, state = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            state = httpx.get(f"{url}/admin/pools", headers=headers, timeout=10.0).json()["pools"][pool]
        except (httpx.HTTPError, ValueError, KeyError):
            state = {}
        if state.get("ready") == replicas and not state.get("starting") and not state.get("draining"):
            print(f"{pool}: {replicas} worker(s) ready: {', '.join(state['workers']) or 'none'}", flush=True)
            return 0
        time.sleep(0.5)
    print(f"epd scale: the {pool} pool did not settle within {timeout_s:.0f} s: {state}", file=sys.stderr)
    return 1


def state_file(port: int) -> Path:
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache" / "epd-serve")
    return base / f"epd-up-{port}.json"


def write_state(port: int, info: dict[str, Any]) -> Path:
    path = state_file(port)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), **info}))
    return path


def _down(args: argparse.Namespace) -> int:
    path = state_file(args.port)
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        print(f"epd down: no cluster started by `epd up` on port {args.port} ({path} missing)", file=sys.stderr)
        return 2
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        print(f"epd down: the `epd up` process {pid} is gone already", file=sys.stderr)
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            print(f"epd down: stopped the cluster of `epd up` (pid {pid})")
            return 0
        time.sleep(0.2)
    print(f"epd down: `epd up` (pid {pid}) still running after {args.timeout:.0f} s", file=sys.stderr)
    return 1


def _running(pid: int) -> bool:
    """Alive and not a zombie (exited, waiting for its parent to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _drain(args: argparse.Namespace) -> int:
    """A preStop hook's drain: ask the worker (any role) and wait for its answer."""
    import asyncio
    import grpc
    from proto import epd_pb2 as pb
    from proto import epd_pb2_grpc as pb_grpc
    token = os.environ.get("EPD_CLUSTER_TOKEN")
    metadata = (("x-epd-cluster-token", token),) if token else ()
    request = pb.DrainRequest(timeout_s=args.timeout, exit=args.exit)

    async def ask() -> pb.DrainResponse:
        async with grpc.aio.insecure_channel(args.worker) as channel:
            for stub in (pb_grpc.DecodeWorkerStub, pb_grpc.PrefillWorkerStub, pb_grpc.EncodeWorkerStub):
                try:
                    return await stub(channel).Drain(request, timeout=args.timeout + 10, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
            raise RuntimeError("the worker has no Drain call")

    try:
        reply = asyncio.run(ask())
    except (grpc.aio.AioRpcError, RuntimeError) as exc:
        print(f"epd drain: error: {args.worker}: {exc}", file=sys.stderr)
        return 2
    print(f"epd drain: {args.worker} " + ("drained" if reply.drained else f"still has {reply.inflight} running"))
    return 0 if reply.drained else 1
