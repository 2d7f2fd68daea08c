"""Worker configuration and its command-line arguments."""
from __future__ import annotations

import argparse
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Transfer-backend config fields the worker sets itself (from --host/--advertise-host);
# --transfer-option refuses them.
WORKER_SET_TRANSFER_FIELDS = ("host", "advertise_host")
# Worker gRPC messages carry a request's images (the router bounds their number and size);
# gRPC's default 4 MiB receive limit would refuse a few large ones.
GRPC_MESSAGE_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


@dataclass(frozen=True)
class WorkerConfig:
    role: str  # "encode", "prefill" or "decode"
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 0  # gRPC; 0 picks a free port
    metrics_port: int | None = None  # HTTP /metrics; None: no metrics server
    worker_id: str = ""
    advertise_host: str | None = None  # address peers use; defaults to host
    router: str | None = None  # register with this router's gRPC address
    transfer: str = "tcp"
    transfer_options: dict[str, Any] = field(default_factory=dict)
    transfer_timeout_s: float = 10.0
    # decode: bound on a prefill worker's first KV chunk of a text prompt (its queue wait
    # included); None: the transfer timeout
    prefill_start_timeout_s: float | None = None
    prefill_timeout_s: float = 60.0
    local_prefill_threshold: int = 64  # decode: prefill locally when fewer tokens are uncached
    # Sessions (decode, engine/sessions.py): turns' KV kept at most for this many sessions
    # (least recently used released first), each released after this long without a turn.
    max_sessions: int = 1024
    session_idle_timeout_s: float = 300.0
    heartbeat_interval_s: float = 1.0
    drain_timeout_s: float = 600.0  # SIGTERM or Drain: how long running requests may take to finish
    # Bounded queue: calls admitted beyond those the engine runs at once (max_num_seqs;
    # encode: encode_max_batch); more are refused with RESOURCE_EXHAUSTED.
    max_queued_requests: int = 256
    # Images (vision-language models): encode batches up to encode_max_batch images per
    # forward; encode (staging) and prefill (receiving) keep embedding_slots slots of
    # embeddings for transfer and an embedding cache of embedding_cache_mb.
    encode_max_batch: int = 32
    embedding_slots: int = 32
    embedding_cache_mb: float = 256.0
    engine_options: dict[str, Any] = field(default_factory=dict)
    # Shared secret of the cluster (worker/auth.py): required on every call this worker
    # serves, attached to every call it makes. None: no token (a trusted network).
    cluster_token: str | None = field(default=None, repr=False)
    router_ca: str | None = None  # PEM file: register with a TLS router, verified against it

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ValueError(f"--max-queued-requests must be >= 0, got {self.max_queued_requests}")
        if self.max_sessions < 0:
            raise ValueError(f"--max-sessions must be >= 0, got {self.max_sessions}")
        tp = self.engine_options.get("tensor_parallel_size", 1)
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"--tensor-parallel-size must be a positive integer, got {tp!r}")
        if tp > 1 and self.role == "encode":
            raise ValueError("--tensor-parallel-size applies to prefill and decode workers; "
                             "an encode worker runs its vision tower on one device")
        if tp > 1 and str(self.engine_options.get("device", "cpu")).startswith("cuda") and self.transfer != "none":
            raise ValueError("--tensor-parallel-size > 1 on CUDA runs only with --transfer none for now "
                             "(the ranks' KV pages are not shared with the transfer endpoint there)")
        for name in ("transfer_timeout_s", "prefill_timeout_s", "session_idle_timeout_s", "prefill_start_timeout_s"):
            if name == "prefill_start_timeout_s" and self.prefill_start_timeout_s is None:
                continue
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name[:-2].replace('_', '-')} must be > 0, got {getattr(self, name)}")

    @property
    def public_host(self) -> str:
        return self.advertise_host or self.host


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    parser.add_argument("--metrics-port", type=int, default=None, help="HTTP port of /metrics")
    parser.add_argument("--worker-id", default="")
    parser.add_argument("--advertise-host", default=None, help="host peers should dial")
    parser.add_argument("--router", default=None, help="router gRPC address to register with")
    parser.add_argument("--router-ca", default=None, metavar="PEM",
                        help="the router's gRPC uses TLS: verify it against this CA certificate")
    parser.add_argument("--cluster-token", default=None,
                        help="shared cluster secret (default: env EPD_CLUSTER_TOKEN, which keeps it out of `ps`)")
    parser.add_argument("--transfer", default="tcp",
                        help="KV transfer backend; 'none' for an aggregated decode worker that prefills itself")
    parser.add_argument("--transfer-option", action="append", default=[], metavar="KEY=VALUE",
                        dest="transfer_option",
                        help="backend config field, repeatable; e.g. port=P (any backend), "
                             "protocol=rdma device_name=mlx5_0 (mooncake), slice_bytes=N (one-sided "
                             "backends); an unknown key lists the valid ones")
    parser.add_argument("--drain-timeout", type=float, default=600.0, dest="drain_timeout_s",
                        help="on SIGTERM (or a Drain call) wait this long for running requests, then exit")
    parser.add_argument("--max-queued-requests", type=int, default=256,
                        help="calls admitted beyond those running (the engine's --max-num-seqs, encode's "
                             "--encode-max-batch); more are refused with RESOURCE_EXHAUSTED")
    parser.add_argument("--transfer-timeout", type=float, default=10.0, dest="transfer_timeout_s",
                        help="bound of one KV write, and of the progress of a remote prefill (decode gives "
                             "up on a prefill worker whose next chunk does not land within it)")
    parser.add_argument("--prefill-timeout", type=float, default=60.0, dest="prefill_timeout_s")
    parser.add_argument("--prefill-start-timeout", type=float, default=None, dest="prefill_start_timeout_s",
                        help="decode: seconds a prefill worker may take to land a text prompt's first KV chunk, "
                             "its queue wait included (default: --transfer-timeout); raise it where prefill "
                             "workers queue many long prompts")
    parser.add_argument("--local-prefill-threshold", type=int, default=64,
                        help="decode: prompts with fewer uncached tokens are prefilled locally")
    parser.add_argument("--max-sessions", type=int, default=1024,
                        help="decode: sessions whose last turn's KV is kept (least recently used released "
                             "first; 0: none)")
    parser.add_argument("--session-idle-timeout", type=float, default=300.0, dest="session_idle_timeout_s",
                        help="decode: seconds a session's kept KV outlives its last turn")
    parser.add_argument("--encode-max-batch", type=int, default=32,
                        help="encode: images per vision-tower forward, at most")
    parser.add_argument("--embedding-slots", type=int, default=32,
                        help="encode/prefill: image embeddings in flight between them (transfer slots)")
    parser.add_argument("--embedding-cache-mb", type=float, default=256.0,
                        help="encode/prefill: image embedding cache size (MiB; 0 turns it off)")


def transfer_options(transfer: str, items: Sequence[str]) -> dict[str, Any]:
    """``--transfer-option`` items, typed and validated against ``transfer``'s config
    (``kv_transfer.TransferOptionError`` says what is wrong and lists valid keys)."""
    from kv_transfer import TransferOptionError, parse_transfer_options
    if transfer == "none":
        if items:
            raise TransferOptionError("--transfer-option needs a transfer backend (--transfer is 'none')")
        return {}
    try:
        return parse_transfer_options(transfer, items, reserved=WORKER_SET_TRANSFER_FIELDS)
    except TransferOptionError:
        raise
    except ValueError as exc:  # unknown backend name
        raise TransferOptionError(str(exc)) from None


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, for a process started next to listen on. Chosen below
    the kernel's ephemeral range when there is room: a port the kernel handed out for a
    bind to port 0 is what any other process's next outgoing connection or port-0
    listener may get meanwhile, and a launcher that passes a port on must not race that."""
    low, _ = _ephemeral_range()
    candidates = random.sample(range(10000, low), min(64, max(0, low - 10000))) if low > 10064 else []
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
