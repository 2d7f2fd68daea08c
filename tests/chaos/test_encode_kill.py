"""An encode worker SIGKILLed (at a seeded moment) and restarted under a load of image
requests: 2 encode, 1 prefill, 1 decode on the tiny vision-language model. Prefill
moves each image to the other encoder (or encodes it itself); no request fails, every
output equals the offline engine's, and the restarted encoder takes images again."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosCluster, rng_for, wait_for
from tests.e2e.test_encode_pool import assert_nothing_held, offline, served, workload

pytestmark = pytest.mark.timeout(300)


def _encoded(cluster: ChaosCluster, worker_id: str) -> int:
    """Images the worker's current process encoded, from its own Status (the router's
    /cluster may still show the killed process's last one)."""
    status = cluster.own_status(worker_id)
    return status.images_encoded_total if status is not None else 0


def test_encode_worker_killed_and_restarted_under_image_load(tmp_path: Path) -> None:
    from engine.model_path import default_vlm_path
    vlm = default_vlm_path()
    rng = rng_for("encode_kill")
    requests, later = workload(32, distinct=32, seed=21), workload(8, distinct=8, seed=22)
    expected, expected_later = offline(vlm, requests), offline(vlm, later)
    victim = rng.choice(["encode-0", "encode-1"])
    # No embedding cache on prefill: every image goes to the encode pool.
    with ChaosCluster(tmp_path, model=str(vlm), num_encode=2, num_prefill=1, num_decode=1,
                      prefill_args=("--embedding-cache-mb", "0"), encode_args=("--embedding-cache-mb", "0")) as cluster:
        async def kill_midway() -> list[str]:
            task = asyncio.ensure_future(served(cluster.http_url, requests, concurrency=8))
            threshold = rng.randrange(1, 12)
            await asyncio.to_thread(wait_for, lambda: cluster.worker(victim)["images_encoded_total"] >= threshold, 60,
                                    0.05)
            cluster.sigkill(victim)
            print(f"SIGKILL {victim} after it encoded {threshold}+ images")
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            cluster.restart(victim)
            return await task

        assert asyncio.run(kill_midway()) == expected  # none failed, none differs
        cluster.wait_routable(victim)
        before = _encoded(cluster, victim)  # counts of the new process
        # New images (a repeated request would be a prefix-cache hit on decode, never
        # encoded): the pool is balanced by queued images, so the restarted one gets some.
        assert asyncio.run(served(cluster.http_url, later, concurrency=4)) == expected_later
        assert _encoded(cluster, victim) > before, "the restarted encode worker took no image"
        assert_nothing_held(cluster.http_url)
