"""`/cluster?view=overview` (what /dashboard draws) against a router with fake workers:
pools, per-worker rates and hit rates, recent errors; the page itself is self-contained."""
from __future__ import annotations

import re

import httpx

from router.cluster_view import RATE_WINDOW_S, RateTracker
from router.dashboard_page import DASHBOARD_HTML
from tests.router.conftest import MakeCluster, wait_until


def test_rates_come_from_the_recent_window() -> None:
    tracker = RateTracker()
    assert tracker.rates("w", {"kv_bytes_sent_total": 0.0}, 100.0)["kv_bytes_sent_per_s"] is None
    assert tracker.rates("w", {"kv_bytes_sent_total": 500.0}, 102.0)["kv_bytes_sent_per_s"] == 250.0
    assert tracker.rates("w", {"kv_bytes_sent_total": 500.0}, 102.1)["kv_bytes_sent_per_s"] == 250.0  # too soon
    later = 102.0 + RATE_WINDOW_S + 2
    assert tracker.rates("w", {"kv_bytes_sent_total": 1500.0}, later)["kv_bytes_sent_per_s"] == 1000.0 / (later - 102.0)
    assert tracker.rates("w", {"kv_bytes_sent_total": 10.0}, later + 1)["kv_bytes_sent_per_s"] is None  # restarted


async def test_overview_shows_pools_workers_and_errors(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=2, prefill=1)
    fields = cluster.prefills[0].fields
    fields.prefix_hit_tokens_total, fields.prefill_tokens_total = 30, 90
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=10) as http:
        assert (await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).status_code == 200
        assert (await http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})).status_code == 400
        await cluster.app.monitor.poll(cluster.app.registry.get("p0"))
        await cluster.decodes[1].stop()
        await wait_until(lambda: not cluster.app.registry.get("d1").state.healthy, timeout=10)
        body = (await http.get("/cluster?view=overview")).json()
        assert (await http.get("/cluster?view=nope")).status_code == 400
    assert body["model"] == cluster.model
    assert body["router"]["requests"] == {"ok": 1.0, "invalid": 1.0} and body["router"]["generation_tokens_total"] == 2
    assert {name: (p["workers"], p["healthy"]) for name, p in body["pools"].items()} == {"prefill": (1, 1),
                                                                                           "decode": (2, 1)}
    by_id = {w["id"]: w for w in body["workers"]}
    assert by_id["p0"]["prefix_cache_hit_rate"] == 0.25 and by_id["d1"]["health"] == "down"
    assert by_id["d1"]["last_error"] and set(by_id["d0"]["rates"]) >= {"kv_bytes_sent_per_s", "requests_per_s"}
    kinds = [(e["source"], e["kind"], e["worker"]) for e in body["recent_errors"]]
    assert ("worker", "unhealthy", "d1") in kinds and ("request", "invalid", "") in kinds


def test_page_needs_nothing_from_elsewhere() -> None:
    assert not re.search(r"(src|href)=\"(?!data:)[^\"#]", DASHBOARD_HTML)  # no external scripts, styles, images
    assert "http://" not in DASHBOARD_HTML and "https://" not in DASHBOARD_HTML and "@import" not in DASHBOARD_HTML
    assert "innerHTML" not in DASHBOARD_HTML  # values go in as text, never as markup
    assert 'fetch("cluster?view=overview"' in DASHBOARD_HTML
