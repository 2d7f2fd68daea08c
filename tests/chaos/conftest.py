"""One 2-prefill + 2-decode chaos cluster shared by the tests of this package (starting
one costs more than most tests): each test gets it with every worker routable and no
fault armed, and leaves it so (tests that kill or restart a process restart it)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos.harness import ChaosCluster, Reference, make_prompts, offline

# Transfer timeout 4 s: a stalled peer fails over within it (the default is 10 s).
TRANSFER_TIMEOUT_S = 4.0
WORKER_ARGS = ("--transfer-timeout", str(TRANSFER_TIMEOUT_S), "--prefill-timeout", "30")
WORKERS = ("prefill-0", "prefill-1", "decode-0", "decode-1")
MAX_TOKENS = 16
# The prompts every test here draws from (one offline reference for all of them): long
# enough for a remote prefill (decode's local threshold is 64 uncached tokens).
POOL = make_prompts(1400, 200, low=72, high=130)


@pytest.fixture(scope="package")
def reference() -> Reference:
    return offline(POOL, MAX_TOKENS)


@pytest.fixture(scope="package")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosCluster]:
    with ChaosCluster(tmp_path_factory.mktemp("chaos"), num_prefill=2, num_decode=2,
                      worker_args=WORKER_ARGS) as cluster:
        yield cluster


@pytest.fixture
def cluster(shared_cluster: ChaosCluster) -> Iterator[ChaosCluster]:
    for name in WORKERS:
        shared_cluster.wait_routable(name)
    yield shared_cluster
    for trigger in shared_cluster.faults_dir.iterdir():
        trigger.unlink()
