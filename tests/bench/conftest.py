"""The benchmark tests that run Triton kernels need the interpreter set up before triton
loads, as tests/engine's conftest does; importing it applies the same set-up."""
from __future__ import annotations

import tests.engine.conftest  # noqa: F401
