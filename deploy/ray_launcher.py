"""`epd up --ray ADDRESS|local`: the router and every worker as Ray actors.

Ray places and supervises; the code inside each actor is the same as `epd router` and
`epd worker` (parsed from the same command lines). Each worker gets a placement group
of one bundle per GPU it uses (STRICT_PACK: one node), aimed at a node chosen per pool
by `--placement-strategy`: `spread` takes the node holding the fewest workers of that
pool, `pack` the one holding the most that still has room. Actors are named
`epd-<role>-<n>` in the Ray namespace `epd-serve` (`ray list actors` shows them), run
with `max_restarts=-1`: an actor that dies is started again by Ray on the same command
line, registers with the router under the same id, and is routed to only once its
Status answers. The router actor sits on the driver's node, where `epd up` prints its
URL. This process (the driver) serves the launcher endpoint for scaling and stops
everything on exit (the actors are not detached).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import threading
from dataclasses import replace
from typing import Any

from deploy.local import ClusterSpec, LocalCluster
from deploy.launcher import LaunchError, LauncherServer

log = logging.getLogger("deploy.ray")
NAMESPACE = "epd-serve"
CONNECT_TIMEOUT_S = 5.0


class RayAddressError(ValueError):
    """The Ray cluster cannot be reached (a usage error: nothing was started)."""


def check_address(address: str) -> None:
    """Fail fast on an address nobody answers (ray.init would retry for a long time)."""
    if address == "local" or address == "auto" or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayAddressError(f"--ray {address!r}: expected HOST:PORT of the Ray head, 'auto' or 'local'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayAddressError(f"cannot reach the Ray cluster at {address}: {exc}") from None


class _Actor:
    """What the cluster keeps per actor, with the part of Popen's interface it uses."""

    def __init__(self, handle: Any, group: Any | None) -> None:
        self.handle = handle
        self.group = group
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode  # Ray restarts a crashed actor; only a kill ends one


class RayCluster(LocalCluster):
    def __init__(self, spec: ClusterSpec, address: str, strategy: str = "spread",
                 cpus_per_worker: float = 1.0) -> None:
        super().__init__(spec)
        check_address(address)
        self.address = address
        self.strategy = strategy
        self.cpus_per_worker = cpus_per_worker
        self.nodes: dict[str, str] = {}  # worker name -> the node its placement group aims at
        self._temp_dir: str | None = None

    # -- starting -----------------------------------------------------------------------

    def start(self, timeout_s: float = 300.0) -> None:
        try:
            self._connect()
            self.launcher = LauncherServer(self, self.spec.host, 0, self.spec.cluster_token)
            self.extra_router_args = ["--expect-encode", str(self.spec.num_encode),
                                      "--expect-prefill", str(self.spec.num_prefill),
                                      "--expect-decode", str(self.spec.num_decode)]
            self._start_router()
            for role, count in (("encode", self.spec.num_encode), ("prefill", self.spec.num_prefill),
                                ("decode", self.spec.num_decode)):
                for index in range(count):
                    self._start_worker(role, index, register=True)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _connect(self) -> None:
        import ray
        if ray.is_initialized():
            return
        if self.address == "local":
            self._temp_dir = tempfile.mkdtemp(prefix="epd-ray-")
            ray.init(num_cpus=max(os.cpu_count() or 1, 16), namespace=NAMESPACE, include_dashboard=False,
                     _temp_dir=self._temp_dir, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)

    def _spawn(self, name: str, args: list[str]) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        env = {"PYTHONUNBUFFERED": "1", **self.spec.env, **self._secrets(name)}
        if name == "router":
            here = ray.get_runtime_context().get_node_id()
            handle = _actor_class("router").options(
                name="epd-router", num_cpus=0, max_restarts=-1, max_concurrency=4,
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
                runtime_env={"env_vars": env}).remote(args)
            ray.get(handle.ready.remote(), timeout=120)
            with self._lock:
                self.processes[name] = _Actor(handle, None)
            return
        role = name.rsplit("-", 1)[0]
        group, node = self._placement(role)
        handle = _actor_class("worker").options(
            name=f"epd-{name}", num_cpus=self.cpus_per_worker, num_gpus=self._gpus(), max_restarts=-1,
            max_concurrency=4, scheduling_strategy=_in_group(group), runtime_env={"env_vars": env}).remote(
            [*args, "--port", "0"])
        with self._lock:
            self.processes[name] = _Actor(handle, group)
            self.nodes[name] = node

    def _gpus(self) -> float:
        """One GPU per worker on a CUDA device (TP is 1 for now: one bundle)."""
        args = list(self.spec.worker_args)
        device = args[args.index("--device") + 1] if "--device" in args[:-1] else "cpu"
        return 1.0 if device.startswith("cuda") else 0.0

    def _placement(self, role: str) -> tuple[Any, str]:
        """A one-bundle STRICT_PACK group aimed at the node the strategy picks."""
        import ray
        from ray.util import placement_group
        bundle = {"CPU": self.cpus_per_worker, **({"GPU": self._gpus()} if self._gpus() else {})}
        node = self._pick_node(role, bundle)
        group = placement_group([bundle], strategy="STRICT_PACK", _soft_target_node_id=node)
        ray.get(group.ready(), timeout=120)
        return group, node

    def _pick_node(self, role: str, bundle: dict[str, float]) -> str:
        import ray
        with self._lock:
            placed = [(n, self.nodes[n]) for n in self.nodes if n not in self.retired]
        used: dict[str, float] = {}
        for _, node in placed:
            used[node] = used.get(node, 0.0) + self.cpus_per_worker
        mine = {node: sum(1 for n, nd in placed if nd == node and n.rsplit("-", 1)[0] == role)
                for node in {nd for _, nd in placed}}
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        fits = [n["NodeID"] for n in nodes
                if all(n["Resources"].get(k, 0.0) - (used.get(n["NodeID"], 0.0) if k == "CPU" else 0.0) >= v
                       for k, v in bundle.items())]
        if not fits:
            raise LaunchError(f"no Ray node has room for a {role} worker ({bundle})", 503)
        if self.strategy == "pack":
            return max(fits, key=lambda n: (mine.get(n, 0), used.get(n, 0.0)))
        return min(fits, key=lambda n: (mine.get(n, 0), used.get(n, 0.0)))

    # -- the launcher backend ------------------------------------------------------------

    def remove_worker(self, name: str) -> None:
        with self._lock:
            actor = self.processes.get(name)
            if actor is None or name == "router":
                raise LaunchError(f"no worker {name!r} was started here", 404)
            self.retired.add(name)
        threading.Thread(target=self._retire, args=(actor,), daemon=True).start()

    def _retire(self, actor: _Actor) -> None:
        """The worker drained and is stopping itself: let it finish, then end the actor."""
        import ray
        try:
            ray.get(actor.handle.stopped.remote(30.0), timeout=40)
        except Exception as exc:  # noqa: BLE001 - the kill below ends it either way
            log.info("actor did not stop by itself: %r", exc)
        _kill(actor)

    def node_of(self, name: str) -> str:
        """The node the worker's actor runs on (asked from the actor itself)."""
        return str(self.info(name)["node_id"])

    def info(self, name: str) -> dict[str, Any]:
        import ray
        return dict(ray.get(self.processes[name].handle.info.remote(), timeout=60))

    def kill(self, name: str) -> None:
        """SIGKILL the actor's process (failure tests): Ray starts it again."""
        os.kill(int(self.info(name)["pid"]), 9)

    def stop(self, timeout_s: float = 10.0) -> None:
        import ray
        for actor in self._stop_launcher():
            _kill(actor)
        if ray.is_initialized():
            ray.shutdown()


def _in_group(group: Any) -> Any:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)


def _kill(actor: _Actor) -> None:
    import ray
    from ray.util import remove_placement_group
    if actor.returncode is not None:
        return
    actor.returncode = 0
    try:
        ray.kill(actor.handle, no_restart=True)
        if actor.group is not None:
            remove_placement_group(actor.group)
    except Exception as exc:  # noqa: BLE001 - stopping is best effort (Ray may be gone)
        log.debug("stopping an actor: %r", exc)


class _ServeInThread:
    """Runs an asyncio service on a thread of the actor (Ray owns the actor's main
    thread, so no signal handlers: drain and stop come as events)."""

    def _launch(self, target: Any) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, args=(target,), daemon=True)
        self._thread.start()
        if not self._ready.wait(600):
            raise TimeoutError("not ready after 600 s")
        if self._error is not None:
            raise self._error

    def _main(self, target: Any) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(target())
        except BaseException as exc:  # noqa: BLE001 - reported by __init__ or logged
            self._error = exc
            log.exception("actor service ended")
        finally:
            self._ready.set()

    def ready(self) -> bool:
        return True

    def stopped(self, timeout_s: float) -> bool:
        """Wait until the service has ended (e.g. a worker after Drain with exit)."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


class _WorkerActor(_ServeInThread):
    def __init__(self, argv: list[str]) -> None:
        from deploy.cli import build_parser
        from deploy.cluster_cli import worker_config
        from deploy.worker_main import run_worker
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        config = worker_config(build_parser().parse_args(argv))
        if config.host not in ("127.0.0.1", "localhost", "::1"):  # reachable from other nodes
            import ray
            config = replace(config, host="0.0.0.0", advertise_host=ray.util.get_node_ip_address())
        self.runtime: Any = None

        async def serve() -> None:
            self.drain, self.stop = asyncio.Event(), asyncio.Event()
            await run_worker(config, drain=self.drain, stop=self.stop, started=self._started)

        self._launch(serve)

    def _started(self, runtime: Any) -> None:
        self.runtime = runtime
        self._ready.set()

    def info(self) -> dict[str, Any]:
        import ray
        return {"id": self.runtime.worker_id, "address": self.runtime.address, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}


class _RouterActor(_ServeInThread):
    def __init__(self, argv: list[str]) -> None:
        from deploy.cli import build_parser
        from router.config import config_from_args
        from router.server import RouterApp
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        config = config_from_args(build_parser().parse_args(argv))

        async def serve() -> None:
            app = RouterApp(config)
            await app.start()
            self._ready.set()
            await asyncio.Event().wait()  # until the actor is killed

        self._launch(serve)


_REMOTE: dict[str, Any] = {}


def _actor_class(name: str) -> Any:
    """The actor classes, made remote when first used (Ray is an optional dependency)."""
    if name not in _REMOTE:
        import ray
        _REMOTE[name] = ray.remote({"worker": _WorkerActor, "router": _RouterActor}[name])
    return _REMOTE[name]
