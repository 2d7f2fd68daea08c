"""`python -m router [options]`: run the router (same options as `epd router`)."""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Sequence

from router.config import parse_config
from router.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except ValueError as exc:
        print(f"router: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
