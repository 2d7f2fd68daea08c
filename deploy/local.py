"""`epd up`: a local cluster of separate processes (router + encode, prefill and decode workers).

Each worker gets a free gRPC port chosen here and is handed to the router on its command
line. `/health` on the router answers 200 once every worker is ready; the launcher
waits for that, prints the endpoints, and stops everything on Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deploy.cli import add_engine_arguments, speculative_options
from engine.errors import ConfigError
from deploy.launcher import LaunchError, LauncherServer
from worker.config import free_port, transfer_options


@dataclass(frozen=True)
class ClusterSpec:
    num_prefill: int = 1
    num_decode: int = 1
    num_encode: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051
    model: str | None = None
    transfer: str = "tcp"
    transfer_options: tuple[str, ...] = ()  # KEY=VALUE, each passed as --transfer-option
    policy: str | None = None
    local_prefill_threshold: int | None = None
    worker_args: tuple[str, ...] = ()  # extra engine/worker flags for every worker
    prefill_args: tuple[str, ...] = ()  # ... for prefill workers only (after worker_args)
    decode_args: tuple[str, ...] = ()
    encode_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    log_dir: str | None = None  # None: children print to this terminal
    env: dict[str, str] = field(default_factory=dict)
    process_env: dict[str, dict[str, str]] = field(default_factory=dict)  # by process name ("prefill-0")
    # Workers register with the router (--router) instead of being named on its command
    # line, as under Kubernetes or Ray: a restarted router learns them again that way.
    register_workers: bool = False
    # Secrets reach the children through their environment, never their command line
    # (visible in `ps`): the cluster token to every process, the keys to the router.
    cluster_token: str | None = field(default=None, repr=False)
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_key: str | None = field(default=None, repr=False)


class LocalCluster:
    """Owns every process it starts. It is also the router's launcher (deploy/launcher.py):
    when a pool grows the router asks it for a worker, which registers with the router
    itself; a worker let go exits after its drain and is `retired` here."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.worker_addresses: dict[str, str] = {}
        self.retired: set[str] = set()  # workers let go on purpose (their exit is no failure)
        self.extra_router_args: list[str] = []  # a launcher's own additions (deploy/ray_launcher.py)
        self.launcher: LauncherServer | None = None
        self._lock = threading.RLock()  # launcher calls come from its threads
        self._args: dict[str, list[str]] = {}  # each process's command line, to restart it

    @property
    def http_url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.spec.host}:{self.spec.grpc_port}"

    def start(self, timeout_s: float = 180.0) -> None:
        try:
            for role, count in (("encode", self.spec.num_encode), ("prefill", self.spec.num_prefill),
                                ("decode", self.spec.num_decode)):
                for index in range(count):
                    self._start_worker(role, index)
            self.launcher = LauncherServer(self, self.spec.host, 0, self.spec.cluster_token)
            self._start_router()
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _common(self) -> list[str]:
        return ["--model", self.spec.model] if self.spec.model else []

    # -- the launcher backend (called from the launcher's threads) ----------------------

    def add_worker(self, role: str) -> str:
        """Start one more worker of `role`; it registers with the router on its own."""
        with self._lock:
            index = next(i for i in range(len(self.processes) + 1) if f"{role}-{i}" not in self.processes)
            self._start_worker(role, index, register=True)
            return f"{role}-{index}"

    def remove_worker(self, name: str) -> None:
        """Stop a worker the router has drained (it is exiting already): SIGTERM, and a
        kill should it still run after the drain timeout."""
        with self._lock:
            proc = self.processes.get(name)
            if proc is None or name == "router":
                raise LaunchError(f"no worker {name!r} was started here", 404)
            self.retired.add(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        threading.Thread(target=_reap, args=(proc, 60.0), daemon=True).start()

    def worker_list(self) -> list[dict[str, object]]:
        with self._lock:
            return [{"id": name, "role": name.split("-")[0], "alive": proc.poll() is None,
                     "exit_code": proc.returncode} for name, proc in self.processes.items() if name != "router"]

    def live_processes(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        """Processes that should be running (not let go by a scale-down)."""
        with self._lock:
            return [(n, p) for n, p in self.processes.items() if n not in self.retired]

    def _start_worker(self, role: str, index: int, register: bool = False) -> None:
        name, port = f"{role}-{index}", free_port(self.spec.host)
        args = ["worker", role, "--host", self.spec.host, "--port", str(port), "--worker-id", name,
                "--transfer", self.spec.transfer, "--metrics-port", str(free_port(self.spec.host)),
                *(arg for item in self.spec.transfer_options for arg in ("--transfer-option", item)),
                *self._common(), *self.spec.worker_args,
                *self._role_args(role)]
        if role == "decode" and self.spec.local_prefill_threshold is not None:
            args += ["--local-prefill-threshold", str(self.spec.local_prefill_threshold)]
        if register or self.spec.register_workers:  # not on the router's command line: it registers itself
            args += ["--router", self.grpc_address]
        self.worker_addresses[name] = f"{self.spec.host}:{port}"
        self._spawn(name, args)

    def _role_args(self, role: str) -> tuple[str, ...]:
        return {"encode": self.spec.encode_args, "prefill": self.spec.prefill_args,
                "decode": self.spec.decode_args}[role]

    def _start_router(self) -> None:
        args = ["router", "--host", self.spec.host, "--port", str(self.spec.port),
                "--grpc-port", str(self.spec.grpc_port), *self._common(), *self.spec.router_args,
                *self.extra_router_args]
        if self.spec.register_workers:  # ready once they have registered
            args += ["--expect-encode", str(self.spec.num_encode), "--expect-prefill", str(self.spec.num_prefill),
                     "--expect-decode", str(self.spec.num_decode)]
        for name, address in ([] if self.spec.register_workers else self.worker_addresses.items()):
            args += [f"--{name.split('-')[0]}", f"{name}={address}"]
        if self.spec.policy:
            args += ["--policy", self.spec.policy]
        if self.launcher is not None:
            args += ["--launcher", self.launcher.url]
        self._spawn("router", args)

    def _spawn(self, name: str, args: list[str]) -> None:
        output = None
        if self.spec.log_dir:
            Path(self.spec.log_dir).mkdir(parents=True, exist_ok=True)
            output = open(Path(self.spec.log_dir) / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child (a restart appends)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.spec.env, **self.spec.process_env.get(name, {}),
               **self._secrets(name)}
        with self._lock:
            self._args[name] = args
            self.processes[name] = subprocess.Popen([sys.executable, "-m", "deploy.cli", *args], env=env,
                                                    stdout=output, stderr=subprocess.STDOUT if output else None)

    def _secrets(self, name: str) -> dict[str, str]:
        spec, out = self.spec, {}
        if spec.cluster_token:
            out["EPD_CLUSTER_TOKEN"] = spec.cluster_token
        if name == "router" and spec.api_keys:
            out["EPD_API_KEY"] = ",".join(spec.api_keys)
        if name == "router" and spec.admin_key:
            out["EPD_ADMIN_KEY"] = spec.admin_key
        return out

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"{self.http_url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"cluster not ready after {timeout_s:.0f} s")

    def check_alive(self) -> None:
        for name, proc in self.live_processes():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")

    def kill(self, name: str) -> None:
        """Kill one component hard (failure tests)."""
        self.processes[name].kill()
        self.processes[name].wait(timeout=10)

    def restart(self, name: str) -> None:
        """Start a stopped component again with its command line (same ports, same id)."""
        proc = self.processes[name]
        if proc.poll() is None:
            raise RuntimeError(f"{name} is still running")
        self._spawn(name, self._args[name])

    def _stop_launcher(self) -> list[Any]:
        """Stop taking launcher calls; what was started, to stop next."""
        if self.launcher is not None:
            self.launcher.close()
            self.launcher = None
        with self._lock:
            return list(self.processes.values())

    def stop(self, timeout_s: float = 10.0) -> None:
        procs = self._stop_launcher()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_up_command(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start a local cluster: router + encode, prefill and decode workers")
    up.add_argument("--encode", type=int, default=0,
                    help="encode workers (vision-language models; the default model becomes the tiny VLM)")
    up.add_argument("--prefill", type=int, default=1, help="prefill workers")
    up.add_argument("--decode", type=int, default=1, help="decode workers")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000, help="router HTTP port")
    up.add_argument("--grpc-port", type=int, default=50051, help="router gRPC port")
    up.add_argument("--transfer", default="tcp", help="KV transfer backend")
    up.add_argument("--transfer-option", action="append", default=[], metavar="KEY=VALUE",
                    dest="transfer_option", help="backend config field for every worker (repeatable)")
    up.add_argument("--policy", default=None, help="router policy")
    up.add_argument("--local-prefill-threshold", type=int, default=None)
    up.add_argument("--max-sessions", type=int, default=None,
                    help="sessions whose KV each decode worker keeps (its --max-sessions)")
    up.add_argument("--session-idle-timeout", type=float, default=None,
                    help="seconds after its last turn that the router and the decode workers let a session go")
    up.add_argument("--log-dir", default=None, help="write each process's log here")
    up.add_argument("--autoscale", action="append", default=[], metavar="POOL=MIN:MAX",
                    help="let the router scale POOL between MIN and MAX workers (repeatable)")
    up.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                    help="one more `epd router` argument, e.g. --router-arg=--autoscale-ttft=1 (repeatable)")
    up.add_argument("--ray", default=None, metavar="ADDRESS|local",
                    help="run the router and workers as Ray actors on this Ray cluster ('local': start one)")
    up.add_argument("--placement-strategy", choices=["spread", "pack"], default="spread",
                    help="with --ray: spread each pool's workers over nodes, or pack them")
    add_engine_arguments(up)
    up.set_defaults(handler=_up, usage_error=up.error)


def _engine_flags(args: argparse.Namespace) -> tuple[str, ...]:
    flags = ["--load-format", args.load_format, "--device", args.device, "--page-size", str(args.page_size),
             "--num-pages", str(args.num_pages), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
             "--max-num-seqs", str(args.max_num_seqs), "--attention-backend", args.attention_backend,
             "--max-pinned-fraction", str(args.max_pinned_fraction)]
    if args.dtype:
        flags += ["--dtype", args.dtype]
    if args.max_model_len:
        flags += ["--max-model-len", str(args.max_model_len)]
    for name in ("no_prefix_cache", "cuda_graphs", "overlap_schedule"):
        if getattr(args, name):
            flags.append("--" + name.replace("_", "-"))
    return tuple(flags)


def _tensor_parallel_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """For prefill and decode workers (encode workers run the vision tower unsplit)."""
    return ("--tensor-parallel-size", str(args.tensor_parallel_size),
            "--tensor-parallel-timeout", str(args.tensor_parallel_timeout_s))


def _speculative_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """For decode workers only: prefill samples one token a request and never drafts."""
    if args.speculative is None:
        return ()
    flags = ["--speculative", args.speculative, "--num-speculative-tokens", str(args.num_speculative_tokens),
             "--speculative-ngram-max", str(args.speculative_ngram_max)]
    if args.speculative_draft_model:
        flags += ["--speculative-draft-model", str(args.speculative_draft_model)]
    if not args.speculative_cuda_graphs:
        flags.append("--no-speculative-cuda-graphs")
    return tuple(flags)


def _up(args: argparse.Namespace) -> int:
    from kv_transfer import TransferOptionError
    if args.prefill < 0 or args.decode < 1 or args.encode < 0:
        raise SystemExit("epd up: --decode must be >= 1, --prefill and --encode >= 0")
    try:  # before any process starts: a bad option would fail every worker
        speculative_options(args)
    except ConfigError as exc:
        args.usage_error(str(exc))
    try:
        options = transfer_options(args.transfer, args.transfer_option)
    except TransferOptionError as exc:
        args.usage_error(str(exc))
    if "port" in options and args.prefill + args.decode + args.encode > 1:
        args.usage_error("--transfer-option port=... would give every worker the same transfer port")
    model = args.model
    if model is None and args.encode:
        from engine.model_path import default_vlm_path
        model = str(default_vlm_path())
    spec = ClusterSpec(num_prefill=args.prefill, num_decode=args.decode, num_encode=args.encode, host=args.host,
                       port=args.port, grpc_port=args.grpc_port, model=model, transfer=args.transfer,
                       transfer_options=tuple(args.transfer_option), policy=args.policy,
                       local_prefill_threshold=args.local_prefill_threshold, worker_args=_engine_flags(args),
                       prefill_args=_tensor_parallel_flags(args),
                       decode_args=(*_session_flags(args, decode=True), *_tensor_parallel_flags(args),
                                    *_speculative_flags(args)),
                       log_dir=args.log_dir,
                       router_args=(*_session_flags(args, decode=False), *_router_flags(args)), **_secrets_from_env())
    _check_autoscale(args)
    if args.ray:
        try:
            from deploy.ray_launcher import RayAddressError, RayCluster
            import ray  # noqa: F401 - the `ray` extra
        except ImportError:
            args.usage_error("--ray needs Ray: pip install 'epd-serve[ray]'")
        try:
            cluster: LocalCluster = RayCluster(spec, args.ray, args.placement_strategy)
        except RayAddressError as exc:
            args.usage_error(str(exc))
    else:
        cluster = LocalCluster(spec)
    stopping = False

    def _terminate(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    cluster.start()
    for sig in (signal.SIGTERM, signal.SIGINT):  # again: ray.init installs handlers of its own
        signal.signal(sig, _terminate)
    from deploy.scale_cli import write_state
    state = write_state(args.port, {"ray": args.ray})
    print(f"epd-serve is up: {args.encode} encode, {args.prefill} prefill, {args.decode} decode worker(s)\n"
          f"  OpenAI HTTP: {cluster.http_url}/v1   (health {cluster.http_url}/health, "
          f"cluster {cluster.http_url}/cluster, metrics {cluster.http_url}/metrics)\n"
          f"  dashboard:   {cluster.http_url}/dashboard\n"
          f"  gRPC:        {cluster.grpc_address}\nPress Ctrl-C to stop.", flush=True)
    try:
        while not stopping:
            for name, proc in cluster.live_processes():
                if proc.poll() is not None:
                    print(f"epd up: {name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
    finally:
        cluster.stop()
        state.unlink(missing_ok=True)
    print("epd-serve stopped", flush=True)
    return 0


def _reap(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _session_flags(args: argparse.Namespace, decode: bool) -> tuple[str, ...]:
    """`epd up`'s session options as the decode workers' (or the router's) flags."""
    flags = []
    if args.session_idle_timeout is not None:
        flags += ["--session-idle-timeout", str(args.session_idle_timeout)]
    if decode and args.max_sessions is not None:
        flags += ["--max-sessions", str(args.max_sessions)]
    return tuple(flags)


def _router_flags(args: argparse.Namespace) -> tuple[str, ...]:
    flags = [arg for spec in args.autoscale for arg in ("--autoscale", spec)]
    return (*flags, *args.router_arg)


def _check_autoscale(args: argparse.Namespace) -> None:
    """A bad --autoscale is a usage error before anything starts."""
    from router.config import RouterConfig, autoscale_bounds
    try:
        bounds = autoscale_bounds(RouterConfig(autoscale=tuple(args.autoscale)))
    except ValueError as exc:
        args.usage_error(str(exc))
    for pool, (low, high) in bounds.items():
        start = getattr(args, pool)
        if not low <= start <= high:
            args.usage_error(f"--{pool} {start} is outside --autoscale {pool}={low}:{high}")


def _secrets_from_env() -> dict[str, object]:
    from router.config import secrets_from_env
    found = secrets_from_env({})
    return {name: found[name] for name in ("cluster_token", "api_keys", "admin_key")}
