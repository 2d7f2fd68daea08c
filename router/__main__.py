"""`python -m router [options]`: run the router (same options as `epd router`)."""
from __future__ import annotations

import sys
from typing import Sequence

from router.config import parse_config
from router.server import run_router


def main(argv: Sequence[str] | None = None) -> int:
    return run_router(lambda: parse_config(argv), "router")


if __name__ == "__main__":
    sys.exit(main())
