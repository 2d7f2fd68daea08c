"""Images at the router: OpenAI image_url parts and gRPC image bytes are checked,
expanded over the model's placeholder tokens and sent to decode with encode workers
spread by load; every bad image is a 400 (INVALID_ARGUMENT) naming the problem."""
from __future__ import annotations

import base64
import hashlib
import io
import random
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from PIL import Image

from engine.multimodal import read_multimodal_info
from engine.model_path import default_vlm_path
from proto import epd_pb2, epd_pb2_grpc
from tests.router.conftest import Cluster, MakeCluster, wait_until
from tests.router.fakes import FakeEncodeWorker
from tests.router.test_http_errors import error_of


def png(width: int = 20, height: int = 12, color: tuple[int, int, int] = (200, 10, 10), fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format=fmt)
    return out.getvalue()


def url_of(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def chat(urls: list[str], text: str = "What is in these?") -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 4}


@pytest.fixture(scope="module")
def vlm() -> Path:
    return default_vlm_path()


async def vlm_cluster(make_cluster: MakeCluster, vlm: Path, encoders: int = 0, **overrides: Any) -> Cluster:
    workers = [FakeEncodeWorker(f"e{i}") for i in range(encoders)]
    for worker in workers:
        await worker.start(0)
    cluster = await make_cluster(model=str(vlm), encode=tuple(f"{w.worker_id}={w.address}" for w in workers),
                                 **overrides)
    cluster.extra["encoders"] = workers
    return cluster


async def post_chat(cluster: Cluster, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=30) as http:
        return await http.post("/v1/chat/completions", json={"model": cluster.model, **body})


async def test_images_reach_decode_expanded_with_hashes(make_cluster: MakeCluster, vlm: Path) -> None:
    cluster = await vlm_cluster(make_cluster, vlm)
    info = read_multimodal_info(vlm)
    images = [png(), png(33, 40, (0, 90, 0), "JPEG"), png()]  # the third repeats the first
    response = await post_chat(cluster, chat([url_of(images[0]), url_of(images[1], "image/jpeg"), url_of(images[2])]))
    assert response.status_code == 200, response.text
    sent = cluster.decodes[0].requests[-1]
    prompt = list(sent.prompt_token_ids)
    assert prompt.count(info.image_token_id) == 3 * info.num_image_tokens
    assert [i.hash for i in sent.images] == [hashlib.sha256(d).hexdigest() for d in images]
    assert [bytes(i.data) for i in sent.images] == images
    for image in sent.images:
        assert image.num_tokens == info.num_image_tokens
        assert set(prompt[image.offset:image.offset + image.num_tokens]) == {info.image_token_id}
        assert not image.encoders  # no encode pool: prefill encodes
    # A text-only request carries no images.
    assert (await post_chat(cluster, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            ).status_code == 200
    assert not cluster.decodes[0].requests[-1].images


async def test_images_spread_over_encoders_by_load(make_cluster: MakeCluster, vlm: Path) -> None:
    cluster = await vlm_cluster(make_cluster, vlm, encoders=2, expect_encode=2)
    e0, e1 = cluster.extra["encoders"]
    await wait_until(lambda: len(cluster.app.registry.healthy("encode")) == 2)
    assert (await post_chat(cluster, chat([url_of(png(10 + i)) for i in range(4)]))).status_code == 200
    firsts = [i.encoders[0].id for i in cluster.decodes[0].requests[-1].images]
    assert sorted(firsts) == ["e0", "e0", "e1", "e1"]
    assert all(len(i.encoders) == 2 for i in cluster.decodes[0].requests[-1].images)  # fallbacks listed
    e0.queued_images = 50  # a busy encoder gets nothing while the other is free
    await wait_until(lambda: cluster.app.registry.get("e0").state.load.queued_images == 50)
    assert (await post_chat(cluster, chat([url_of(png(30 + i)) for i in range(3)]))).status_code == 200
    assert [i.encoders[0].id for i in cluster.decodes[0].requests[-1].images] == ["e1"] * 3
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        health = (await http.get("/health")).json()
        assert health["healthy_encode"] == 2
        workers = (await http.get("/cluster")).json()
        assert {w["id"]: w["queued_images"] for w in workers if w["role"] == "encode"} == {"e0": 50, "e1": 0}
        metrics = (await http.get("/metrics")).text
        model = cluster.model
        assert f'epd_router_worker_queued_images{{model="{model}",pool="encode",worker="e0"}} 50.0' in metrics


def noise(width: int, height: int) -> bytes:
    out = io.BytesIO()
    pixels = random.Random(width * 1000 + height).randbytes(width * height * 3)
    Image.frombytes("RGB", (width, height), pixels).save(out, format="PNG")
    return out.getvalue()


def _truncated() -> bytes:
    data = noise(16, 16)
    return data[: len(data) // 2]


BAD = [
    (chat([url_of(b"this is not an image at all")]), "not an image"),
    (chat([url_of(_truncated())]), "truncated"),
    (chat(["data:image/png;base64,@@@not-base64@@@"]), "base64"),
    (chat(["data:text/plain;base64," + base64.b64encode(b"hello").decode()]), "text/plain"),
    (chat([url_of(noise(64, 64))]), "size limit"),
    (chat([url_of(png())] * 3), "at most 2"),
    (chat(["https://example.invalid/cat.png"]), "disabled"),
    (chat(["ftp://host/cat.png"]), "data: URL"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}], "max_tokens": 2}, "image_url"),
    ({"prompt": "a <image> b", "max_tokens": 2}, "placeholder"),
]


async def test_bad_images_are_400s_naming_the_problem(make_cluster: MakeCluster, vlm: Path) -> None:
    cluster = await vlm_cluster(make_cluster, vlm, max_images_per_request=2, max_image_bytes=1500)
    for body, words in BAD:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        async with httpx.AsyncClient(base_url=cluster.base_url, timeout=30) as http:
            response = await http.post(path, json={"model": cluster.model, **body})
        assert response.status_code == 400, (words, response.text)
        error = error_of(response, 400)
        assert words in error["message"], (words, error)
        assert error["type"] == "invalid_request_error"
    assert not cluster.decodes[0].requests  # nothing bad reached a worker
    assert (await post_chat(cluster, chat([url_of(png())]))).status_code == 200  # still serving


async def test_text_model_refuses_images(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    response = await post_chat(cluster, chat([url_of(png())]))
    assert "does not take images" in error_of(response, 400)["message"]


async def test_grpc_generate_with_images(make_cluster: MakeCluster, vlm: Path) -> None:
    cluster = await vlm_cluster(make_cluster, vlm)
    info = read_multimodal_info(vlm)
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        stub = epd_pb2_grpc.RouterStub(channel)
        request = epd_pb2.GenerateRequest(text=f"look {info.image_token} here", images=[png()],
                                          sampling=epd_pb2.SamplingParams(max_tokens=3))
        responses = [r async for r in stub.Generate(request, timeout=30)]
        assert responses[-1].WhichOneof("event") == "finished"
        sent = cluster.decodes[0].requests[-1]
        assert len(sent.images) == 1 and bytes(sent.images[0].data) == png()
        for images, words in (([b"junk"], "not an image"), ([png(), png()], "placeholder")):
            bad = epd_pb2.GenerateRequest(text=f"look {info.image_token} here", images=images)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [r async for r in stub.Generate(bad, timeout=30)]
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()
