"""Observability of a real E/P/D cluster (tiny vision-language model: one encode, one
prefill, one decode worker), after text and image traffic:

- the router's and every worker's /metrics parse with prometheus_client's parser,
  follow the naming rules, and hold every metric the Grafana dashboard queries;
- the /dashboard page, in headless Chromium, shows every worker and follows a worker
  that stops."""
from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.client.transport import data_url
from bench.client.workloads import random_png
from deploy.local import LocalCluster
from engine.model_path import default_vlm_path
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from tests.e2e.cluster import make_cluster, wait_for

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "epd-serve-dashboard.json"
STUBS = {"encode": pb_grpc.EncodeWorkerStub, "prefill": pb_grpc.PrefillWorkerStub, "decode": pb_grpc.DecodeWorkerStub}
# Families that exist but stay empty without the autoscaler at work.
EMPTY_WITHOUT_AUTOSCALING = {"epd_autoscaler_utilization", "epd_autoscaler_desired_replicas",
                             "epd_autoscaler_decisions"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with make_cluster(tmp_path_factory.mktemp("observability"), num_encode=1, model=str(default_vlm_path())) as c:
        send_traffic(c)
        yield c


def send_traffic(cluster: LocalCluster) -> None:
    """Long prompts (prefilled remotely, KV shipped), a repeat (prefix-cache hits) and
    requests with images (encoded on the encode worker)."""
    rng = random.Random(0)
    prompt = [rng.randrange(10, 500) for _ in range(120)]
    image = data_url(random_png(rng, 32))
    with httpx.Client(base_url=cluster.http_url, timeout=60) as http:
        for body in ({"prompt": prompt, "max_tokens": 6}, {"prompt": prompt, "max_tokens": 4}):
            assert http.post("/v1/completions", json=body).status_code == 200
        for text in ("What is in this picture?", "Describe it again."):
            content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]
            response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                                "max_tokens": 5})
            assert response.status_code == 200, response.text
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400
    # epd bench's multimodal workload, over both APIs (images as data URLs / gRPC bytes).
    for api in (["--url", cluster.http_url], ["--url", cluster.grpc_address, "--grpc"]):
        done = subprocess.run([sys.executable, "-m", "deploy.cli", "bench", *api, "--workload", "multimodal",
                               "--num-requests", "3", "--images", "2", "--distinct-images", "3", "--image-size", "24",
                               "--input-len", "4", "--output-len", "3", "--concurrency", "2", "--no-progress"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "requests: 3 ok, 0 failed of 3 sent" in done.stdout, done.stdout + done.stderr


def workers(cluster: LocalCluster) -> list[dict[str, Any]]:
    return httpx.get(f"{cluster.http_url}/cluster", timeout=5).json()


async def metrics_urls(entries: list[dict[str, Any]]) -> dict[str, str]:
    """Each worker's /metrics URL, from its own Status."""
    out = {}
    for entry in entries:
        async with grpc.aio.insecure_channel(entry["address"]) as channel:
            status = await STUBS[entry["role"]](channel).Status(pb.StatusRequest(), timeout=5)
        out[entry["id"]] = f"http://{status.metrics_address}/metrics"
    return out


def scrape(url: str) -> list[Any]:
    return list(text_string_to_metric_families(httpx.get(url, timeout=5).text))


def dashboard_metric_names() -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    return {name for expr in exprs for name in re.findall(r"\bepd_[a-z0-9_]+", expr)}


def check_naming(family: Any, source: str) -> None:
    where = f"{family.name} on {source}"
    assert family.name.startswith("epd_"), where
    if family.type == "gauge":
        assert not family.name.endswith("_total"), f"gauge {where} ends in _total"
    if family.type == "counter":
        assert all(s.name in (family.name + "_total", family.name + "_created") for s in family.samples), where
    if family.type == "histogram":
        assert family.name.endswith("_seconds"), f"histogram {where} is not in seconds"
    required = {"pool", "worker", "model"} if family.name.startswith(("epd_worker_", "epd_router_worker_")) else \
        {"model"} if family.name.startswith("epd_router_") else {"pool"}
    assert all(required <= set(s.labels) for s in family.samples), f"{where} lacks labels {required}"


def test_metrics_parse_follow_the_rules_and_cover_the_dashboard(cluster: LocalCluster) -> None:
    entries = workers(cluster)
    assert sorted(e["role"] for e in entries) == ["decode", "encode", "prefill"]
    sources = {"router": f"{cluster.http_url}/metrics", **asyncio.run(metrics_urls(entries))}
    time.sleep(1.2)  # workers refresh their status snapshot twice a second
    samples: set[str] = set()
    empty: set[str] = set()
    for source, url in sources.items():
        for family in scrape(url):
            check_naming(family, source)
            samples |= {s.name for s in family.samples}
            if not family.samples:
                empty.add(family.name)
    used = dashboard_metric_names()
    assert len(used) >= 40
    family_of = {name: re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    missing = {name for name in used if name not in samples and family_of[name] not in empty}
    assert missing == set(), f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    only_empty = {family_of[name] for name in used if name not in samples}
    assert only_empty <= EMPTY_WITHOUT_AUTOSCALING, only_empty
    # The traffic shows where it went: KV shipped per backend, images encoded, pages counted.
    decode = scrape(sources["decode-0"])
    by_name = {f.name: f for f in [*decode, *scrape(sources["prefill-0"]), *scrape(sources["encode-0"])]}
    sent = [s for s in by_name["epd_worker_kv_bytes_sent"].samples if s.labels["pool"] == "prefill"]
    assert sent and sent[0].labels["backend"] == "tcp" and sent[0].value > 0
    writes = [s for s in by_name["epd_worker_kv_transfer_write_seconds"].samples if s.name.endswith("_count")]
    assert writes and all(s.value >= 1 for s in writes)
    assert any(s.value >= 1 for s in by_name["epd_worker_images_encoded"].samples)
    utilization = by_name["epd_worker_kv_page_utilization"].samples
    assert utilization and all(0 <= s.value <= 1 for s in utilization)


def _browser(profile: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)


def _rows(driver: Any) -> dict[str, str]:
    """worker id -> health, as the page shows them now."""
    found = driver.execute_script(
        "return [...document.querySelectorAll('tr.worker')].map(r => [r.dataset.worker, r.dataset.health])")
    return dict(found)


@pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("chromedriver") is None,
                    reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)")
def test_dashboard_in_headless_chromium_follows_a_stopped_worker(cluster: LocalCluster, tmp_path: Path) -> None:
    expected = {e["id"]: "healthy" for e in workers(cluster)}
    with tempfile.TemporaryDirectory() as profile:
        driver = _browser(profile)
        try:
            driver.set_page_load_timeout(30)
            driver.get(f"{cluster.http_url}/dashboard?refresh=0.5")
            wait_for(lambda: _rows(driver) == expected, timeout_s=20)
            page = driver.find_element("tag name", "body").text
            assert "tiny" in page and "Recent errors" in page and "live" in page
            shot = tmp_path / "dashboard.png"
            shot.write_bytes(driver.get_screenshot_as_png())
            assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and shot.stat().st_size > 10_000
            updates = int(driver.execute_script("return document.body.dataset.updates"))
            cluster.kill("encode-0")
            wait_for(lambda: _rows(driver).get("encode-0") == "down", timeout_s=20)
            assert _rows(driver) == {**expected, "encode-0": "down"}
            assert int(driver.execute_script("return document.body.dataset.updates")) > updates
            errors = driver.find_element("id", "errors").text
            assert "encode-0" in errors and "Status failing" in errors
            (tmp_path / "dashboard-after-stop.png").write_bytes(driver.get_screenshot_as_png())
        finally:
            driver.quit()
