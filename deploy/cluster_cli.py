"""Cluster commands of the `epd` CLI: `epd worker`, `epd router`, `epd up`."""
from __future__ import annotations

import argparse

from deploy.cli import add_engine_arguments, engine_options
from worker.auth import cluster_token_from
from worker.config import WorkerConfig, add_worker_arguments, transfer_options


def add_commands(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="start one encode, prefill or decode worker")
    worker.add_argument("role", choices=["encode", "prefill", "decode"])
    add_engine_arguments(worker)
    add_worker_arguments(worker)
    worker.set_defaults(handler=_worker, usage_error=worker.error)
    add_router_command(sub)
    from deploy.local import add_up_command
    add_up_command(sub)
    from deploy import scale_cli
    scale_cli.add_commands(sub)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        role=args.role, model=args.model, host=args.host, port=args.port, metrics_port=args.metrics_port,
        worker_id=args.worker_id, advertise_host=args.advertise_host, router=args.router,
        transfer=args.transfer, transfer_options=transfer_options(args.transfer, args.transfer_option),
        transfer_timeout_s=args.transfer_timeout_s, prefill_start_timeout_s=args.prefill_start_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        prefill_timeout_s=args.prefill_timeout_s, local_prefill_threshold=args.local_prefill_threshold,
        encode_max_batch=args.encode_max_batch, embedding_slots=args.embedding_slots,
        embedding_cache_mb=args.embedding_cache_mb, engine_options=engine_options(args),
        cluster_token=cluster_token_from(args.cluster_token), router_ca=args.router_ca,
        max_queued_requests=args.max_queued_requests, max_sessions=args.max_sessions,
        session_idle_timeout_s=args.session_idle_timeout_s)


def _worker(args: argparse.Namespace) -> int:
    from kv_transfer import TransferOptionError
    from deploy.worker_main import main
    try:
        config = worker_config(args)
    except (TransferOptionError, ValueError) as exc:
        args.usage_error(str(exc))  # exits 2 with the usage line, like any bad flag
    return main(config)


def add_router_command(sub: argparse._SubParsersAction) -> None:
    """`epd router [options]`: the router alone (gRPC + OpenAI HTTP API)."""
    from router.config import add_router_arguments
    parser = sub.add_parser("router", help="run the router (gRPC + OpenAI-compatible HTTP)")
    add_router_arguments(parser)
    parser.set_defaults(handler=_run_router)


def _run_router(args: argparse.Namespace) -> int:
    from router.config import config_from_args
    from router.server import run_router
    return run_router(lambda: config_from_args(args), "epd router")
