"""The encode pool end to end: real processes (`epd up`'s launcher), images as OpenAI
`image_url` data URLs, outputs against the offline engine on the same checkpoint."""
from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from engine import LLM, SamplingParams
from tests.e2e.cluster import by_role, cluster_status, make_cluster, wait_for

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
MAX_TOKENS = 8


def png(seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    width, height = 24 + seed % 40, 20 + (seed * 7) % 50
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def messages(text: str, images: list[bytes]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(d)}} for d in images]
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def workload(count: int, distinct: int, seed: int) -> list[list[bytes]]:
    """`count` requests of 1 to 4 images drawn from `distinct` images (so some repeat)."""
    rng = random.Random(seed)
    pool = [png(seed * 1000 + i) for i in range(distinct)]
    return [[rng.choice(pool) for _ in range(rng.randint(1, 4))] for _ in range(count)]


@pytest.fixture(scope="module")
def vlm_path() -> Path:
    from engine.model_path import default_vlm_path
    return default_vlm_path()


def offline(vlm_path: Path, requests: list[list[bytes]]) -> list[str]:
    llm = LLM(str(vlm_path))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = [llm.chat(messages(f"Describe image set {i}.", images), params)[0] for i, images in enumerate(requests)]
    return [out.outputs[0].text for out in outputs]


async def served(url: str, requests: list[list[bytes]], concurrency: int = 16) -> list[str]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(index: int, images: list[bytes]) -> str:
            async with gate:
                body = {"model": model_name(url), "messages": messages(f"Describe image set {index}.", images),
                        "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
                response = await client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["message"]["content"]
        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))


def model_name(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]


def assert_nothing_held(url: str) -> None:
    """No KV page held by a request anywhere, every embedding slot free, no image queued."""
    def idle() -> bool:
        workers = [w for w in cluster_status_url(url) if w["healthy"]]  # a dead one holds nothing
        pages = all(w["kv_pages_free"] + w["kv_pages_cached"] == w["kv_pages_total"] and w["running"] == 0
                    for w in workers if w["role"] in ("prefill", "decode"))
        slots = all(w.get("embedding_slots_free", 0) == w.get("embedding_slots_total", 0)
                    for w in workers if w["role"] in ("encode", "prefill"))
        return pages and slots and all(w.get("queued_images", 0) == 0 for w in workers)
    try:
        wait_for(idle, timeout_s=10)
    except TimeoutError:
        raise AssertionError(f"still held: {cluster_status_url(url)}") from None


def cluster_status_url(url: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/cluster", timeout=5).json()
    return body["workers"] if isinstance(body, dict) else body


def settled_status(cluster: Any, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """/cluster shows each worker's last Status poll (every 0.5 s): wait until two reads
    1.2 s apart agree, so counters reflect every request already answered."""
    counters = ("images_encoded_total", "embedding_cache_hits_total", "requests_total")
    key = lambda entries: sorted((e["id"], *(e.get(c) for c in counters)) for e in entries)  # noqa: E731
    deadline = time.monotonic() + timeout_s
    last = cluster_status(cluster)
    while time.monotonic() < deadline:
        time.sleep(1.2)
        now = cluster_status(cluster)
        if key(now) == key(last):
            return now
        last = now
    raise TimeoutError(f"/cluster counters still changing after {timeout_s} s")


def test_hundred_image_requests_match_offline(tmp_path: Path, vlm_path: Path) -> None:
    requests = workload(100, distinct=40, seed=1)
    expected = offline(vlm_path, requests)
    # Prefill without its own embedding cache: repeats must be served by the encode pool's.
    cluster = make_cluster(tmp_path, model=str(vlm_path), num_encode=2, num_prefill=1, num_decode=1,
                           prefill_args=("--embedding-cache-mb", "0"))
    with cluster:
        url = cluster.http_url
        got = asyncio.run(served(url, [[*r] for r in requests]))
        mismatched = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
        assert not mismatched, f"{len(mismatched)} outputs differ from the offline engine, e.g. #{mismatched[:5]}"
        assert_nothing_held(url)
        encoders = by_role(settled_status(cluster), "encode")
        assert len(encoders) == 2 and all(e["images_encoded_total"] > 0 for e in encoders), encoders
        assert sum(e["embedding_cache_hits_total"] for e in encoders) > 0
        distinct = len({image for r in requests for image in r})
        assert sum(e["images_encoded_total"] for e in encoders) < sum(len(r) for r in requests)
        assert sum(e["images_encoded_total"] for e in encoders) >= distinct
        prefill = by_role(cluster_status(cluster), "prefill")[0]
        assert prefill["images_encoded_total"] == 0  # the pool did all the image work
        # Bad images are refused with a 400 and the cluster keeps serving.
        bad = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": model_name(url), "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]})
        assert bad.status_code == 400 and "image" in bad.json()["error"]["message"]
        assert asyncio.run(served(url, requests[:3])) == expected[:3]


def test_killed_encode_workers_fall_back_without_failures(tmp_path: Path, vlm_path: Path) -> None:
    requests = workload(48, distinct=48, seed=2)
    expected = offline(vlm_path, requests)
    cluster = make_cluster(tmp_path, model=str(vlm_path), num_encode=2, num_prefill=1, num_decode=1,
                           prefill_args=("--embedding-cache-mb", "0"))
    with cluster:
        url = cluster.http_url

        async def kill_midway() -> list[str]:
            task = asyncio.ensure_future(served(url, requests, concurrency=8))
            await asyncio.to_thread(wait_for, lambda: any(
                e["images_encoded_total"] > 0 for e in by_role(cluster_status(cluster), "encode")), 60, 0.02)
            cluster.kill("encode-0")
            return await task

        assert asyncio.run(kill_midway()) == expected  # none failed, none differs
        # The survivor took over; then with no encoder left, prefill encodes itself.
        wait_for(lambda: len([e for e in by_role(cluster_status(cluster), "encode") if e["healthy"]]) == 1, 15)
        cluster.kill("encode-1")
        wait_for(lambda: not [e for e in by_role(cluster_status(cluster), "encode") if e["healthy"]], 15)
        more = workload(6, distinct=6, seed=3)
        assert asyncio.run(served(url, more)) == offline(vlm_path, more)
        # /cluster shows the last Status poll (every 0.5 s), so wait for the prefill's count to arrive.
        wait_for(lambda: by_role(cluster_status(cluster), "prefill")[0]["images_encoded_total"] > 0, 15)
        assert_nothing_held(url)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_transformers_saved_llava_through_one_encode_prefill_decode(tmp_path: Path, vision: str) -> None:
    """Acceptance 1's cluster half: a checkpoint written by transformers' save_pretrained
    (its logits match transformers in tests/engine/test_vlm_vs_transformers.py) served
    through 1 encode / 1 prefill / 1 decode, greedy, token for token as offline."""
    from tests.engine.hf_models import save_hf_llava
    path = save_hf_llava(vision, tmp_path / "model", seed=11)
    requests = workload(12, distinct=8, seed=4)
    expected = offline(path, requests)
    cluster = make_cluster(tmp_path, model=str(path), num_encode=1, num_prefill=1, num_decode=1)
    with cluster:
        assert asyncio.run(served(cluster.http_url, requests, concurrency=4)) == expected
        assert_nothing_held(cluster.http_url)
        distinct = len({image for r in requests for image in r})
        # /cluster shows each worker's last Status (polled every 0.5 s): wait for it.
        wait_for(lambda: by_role(cluster_status(cluster), "encode")[0]["images_encoded_total"] >= distinct, 10)
        assert by_role(cluster_status(cluster), "prefill")[0]["images_encoded_total"] == 0
