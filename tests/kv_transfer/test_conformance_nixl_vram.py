"""The conformance suite again, with NIXL moving GPU memory (VRAM regions).

Every test of ``test_conformance`` is collected here a second time with the
``factory`` fixture below: endpoints in this process register CUDA tensors.
Receivers in a separate process (``peer_main``) keep CPU regions, so those
tests move VRAM into DRAM. Needs CUDA and NIXL with a CUDA-enabled UCX
(``nixl-cu12``); run through the device tool with ``-m gpu``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kv_transfer import backend_availability
from tests.kv_transfer.support import FACTORIES, BackendFactory
from tests.kv_transfer.test_conformance import *  # noqa: F401,F403  (re-collected here)

# Replaces the module mark imported with the tests.
pytestmark = [  # type: ignore[assignment]
    pytest.mark.gpu,
    pytest.mark.timeout(60),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(backend_availability()["nixl"] is not None,
                       reason=str(backend_availability()["nixl"])),
]


@pytest.fixture
def factory() -> BackendFactory:
    return dataclasses.replace(FACTORIES["nixl"], device="cuda")
