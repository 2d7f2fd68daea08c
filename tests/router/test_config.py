"""Command-line options and the `epd router` command."""
from __future__ import annotations

import argparse

import pytest

from deploy.cluster_cli import add_router_command
from router.config import RouterConfig, parse_config


def test_defaults_and_workers() -> None:
    config = parse_config(["--decode", "127.0.0.1:7001", "--decode", "big=10.0.0.2:7001",
                           "--prefill", "127.0.0.1:7002", "--policy", "round_robin", "--max-retries", "4"])
    assert (config.port, config.grpc_port, config.host) == (8000, 50051, "127.0.0.1")
    assert config.policy == "round_robin" and config.max_retries == 4
    workers = [(w.role, w.id, w.address) for w in config.static_workers()]
    assert workers == [("prefill", "prefill-0", "127.0.0.1:7002"), ("decode", "decode-0", "127.0.0.1:7001"),
                       ("decode", "big", "10.0.0.2:7001")]
    assert RouterConfig().policy == "prefix_aware"


@pytest.mark.parametrize("argv", [["--policy", "fastest"], ["--decode", "nohost"], ["--max-concurrent-requests", "0"]])
def test_bad_options(argv: list[str]) -> None:
    with pytest.raises(ValueError):
        parse_config(argv)


def test_epd_router_command() -> None:
    parser = argparse.ArgumentParser(prog="epd")
    add_router_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["router", "--port", "9000", "--decode", "127.0.0.1:1"])
    assert args.command == "router" and args.port == 9000 and callable(args.handler)
