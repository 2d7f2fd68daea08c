"""Cluster commands of the `epd` CLI."""
from __future__ import annotations

import argparse


def add_router_command(sub: argparse._SubParsersAction) -> None:
    """`epd router [options]`: the router alone (gRPC + OpenAI HTTP API)."""
    from router.config import add_router_arguments
    parser = sub.add_parser("router", help="run the router (gRPC + OpenAI-compatible HTTP)")
    add_router_arguments(parser)
    parser.set_defaults(handler=_run_router)


def _run_router(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import sys

    from router.config import config_from_args
    from router.server import serve
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"epd router: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0
