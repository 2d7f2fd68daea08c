"""The live cluster page the router serves at GET /dashboard: one self-contained HTML
document (inline CSS and script, nothing fetched from elsewhere, so it works offline)
that reads `/cluster?view=overview` every few seconds (`?refresh=SECONDS`, 2 by
default) and redraws pools, workers, KV pages, cache hit rates, transfer rates and the
recent errors. Values reach the page as text nodes only, never as markup."""
from __future__ import annotations

DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>epd-serve cluster</title>
<link rel="icon" href="data:,">
<style>
  :root { --bg: #f6f7f9; --card: #fff; --ink: #1d2330; --mute: #6b7280; --ok: #15803d; --bad: #b91c1c;
          --warn: #b45309; --line: #e5e7eb; --used: #2563eb; --cached: #93c5fd; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg);
         color: var(--ink); }
  header { display: flex; align-items: center; gap: 16px; padding: 12px 20px; background: var(--ink); color: #fff; }
  header h1 { font-size: 18px; margin: 0; font-weight: 600; }
  header .meta { color: #cbd5e1; font-size: 13px; }
  #conn { margin-left: auto; font-size: 13px; }
  #conn::before { content: ""; display: inline-block; width: 9px; height: 9px; border-radius: 50%;
                  margin-right: 6px; background: var(--mute); }
  #conn.ok::before { background: #4ade80; } #conn.bad::before { background: #f87171; }
  main { padding: 16px 20px; display: grid; gap: 16px; }
  section { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
  h2 { font-size: 15px; margin: 0 0 10px; }
  .cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
  .card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; }
  .card .v { font-size: 20px; font-weight: 600; } .card .k { color: var(--mute); font-size: 12px; }
  table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
  th, td { text-align: right; padding: 5px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
  th { color: var(--mute); font-weight: 500; font-size: 12px; }
  th:first-child, td:first-child, td.l, th.l { text-align: left; }
  .health { font-weight: 600; } .health.healthy { color: var(--ok); } .health.down { color: var(--bad); }
  .health.draining { color: var(--warn); }
  .bar { display: inline-flex; width: 110px; height: 10px; background: var(--line); border-radius: 3px;
         overflow: hidden; vertical-align: middle; margin-right: 6px; }
  .bar .u { background: var(--used); } .bar .c { background: var(--cached); }
  .err { color: var(--bad); white-space: normal; text-align: left; max-width: 420px; }
  ul#errors { list-style: none; margin: 0; padding: 0; }
  ul#errors li { padding: 4px 0; border-bottom: 1px solid var(--line); }
  ul#errors .t { color: var(--mute); margin-right: 8px; font-variant-numeric: tabular-nums; }
  .empty { color: var(--mute); }
</style>
</head>
<body>
<header>
  <h1>epd-serve cluster</h1>
  <span class="meta" id="model"></span>
  <span class="meta" id="updated">loading&hellip;</span>
  <span id="conn">connecting</span>
</header>
<main>
  <section><h2>Router</h2><div class="cards" id="router"></div></section>
  <section><h2>Pools</h2>
    <table id="pools"><thead><tr><th>pool</th><th>workers</th><th>healthy</th><th>draining</th><th>running</th>
      <th>waiting</th><th>KV pages used</th><th>prefix-cache hit rate</th><th>queued prefill tokens</th>
      <th>queued images</th><th>requests/s</th><th>KV sent</th><th>KV received</th></tr></thead><tbody></tbody></table>
  </section>
  <section><h2>Workers</h2>
    <table id="workers"><thead><tr><th>worker</th><th class="l">pool</th><th class="l">address</th>
      <th class="l">health</th><th>running</th><th>waiting</th><th class="l">KV pages (used / cached / total)</th>
      <th>prefix-cache hit rate</th><th>prefill tokens/s</th><th>KV sent</th><th>KV received</th>
      <th>images/s</th><th>routed</th><th class="l">last error</th></tr></thead><tbody></tbody></table>
  </section>
  <section><h2>Recent errors</h2><ul id="errors"></ul></section>
</main>
<script>
"use strict";
const params = new URLSearchParams(location.search);
const REFRESH_MS = Math.max(500, 1000 * (Number(params.get("refresh")) || 2));

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function num(v, digits) {
  if (v === null || v === undefined) return "\\u2013";
  return Number(v).toLocaleString(undefined, {maximumFractionDigits: digits === undefined ? 0 : digits});
}
function pct(v) { return v === null || v === undefined ? "\\u2013" : (100 * v).toFixed(1) + " %"; }
function rate(v, unit) {
  if (v === null || v === undefined) return "\\u2013";
  const steps = unit === "B" ? ["B/s", "KB/s", "MB/s", "GB/s"] : ["/s", "k/s", "M/s", "G/s"];
  let i = 0;
  while (Math.abs(v) >= 1000 && i < steps.length - 1) { v /= 1000; i++; }
  return v.toFixed(v < 10 && i > 0 ? 2 : 1) + " " + steps[i];
}
function clock(t) { return t ? new Date(t * 1000).toLocaleTimeString() : ""; }
function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}
function replaceBody(table, rows) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren(...rows);
}
function kvBar(w) {
  const td = el("td", null, "l");
  const bar = el("span", null, "bar");
  const total = w.kv_pages_total || 0;
  const used = el("span", null, "u"), cached = el("span", null, "c");
  used.style.width = total ? (100 * w.kv_pages_used / total) + "%" : "0";
  cached.style.width = total ? (100 * w.kv_pages_cached / total) + "%" : "0";
  bar.append(used, cached);
  td.append(bar, document.createTextNode(num(w.kv_pages_used) + " / " + num(w.kv_pages_cached) + " / " + num(total)));
  return td;
}
function renderRouter(d) {
  const r = d.router, req = r.requests || {};
  const ok = req.ok || 0;
  const failed = Object.entries(req).filter(([k]) => k !== "ok").reduce((s, [, v]) => s + v, 0);
  const cards = [["requests ok", num(ok)], ["requests not ok", num(failed)], ["running", num(r.running)],
                 ["queued", num(r.queued)], ["prompt tokens", num(r.prompt_tokens_total)],
                 ["generated tokens", num(r.generation_tokens_total)],
                 ["prefix-cache hit rate", pct(r.prefix_cache_hit_rate)], ["decode retries", num(r.decode_retries_total)]];
  document.getElementById("router").replaceChildren(...cards.map(([k, v]) => {
    const card = el("div", null, "card"); card.append(el("div", v, "v"), el("div", k, "k")); return card;
  }));
}
function renderPools(d) {
  const rows = Object.entries(d.pools).map(([name, p]) => {
    const tr = row([name, num(p.workers), num(p.healthy), num(p.draining), num(p.running), num(p.waiting),
                    pct(p.kv_page_utilization), pct(p.prefix_cache_hit_rate), num(p.queued_prefill_tokens),
                    num(p.queued_images), rate(p.rates.requests_per_s), rate(p.rates.kv_bytes_sent_per_s, "B"),
                    rate(p.rates.kv_bytes_received_per_s, "B")]);
    tr.dataset.pool = name;
    return tr;
  });
  replaceBody("#pools", rows.length ? rows : [row([el("td", "no workers", "empty")])]);
}
function renderWorkers(d) {
  const rows = d.workers.map((w) => {
    const hit = w.role === "encode" ? w.embedding_cache_hit_rate : w.prefix_cache_hit_rate;
    const tr = row([w.id, el("td", w.role, "l"), el("td", w.address, "l"), el("td", w.health, "l health " + w.health),
                    num(w.running), num(w.waiting), kvBar(w), pct(hit), rate(w.rates.prefill_tokens_per_s),
                    rate(w.rates.kv_bytes_sent_per_s, "B"), rate(w.rates.kv_bytes_received_per_s, "B"),
                    rate(w.rates.images_encoded_per_s), num(w.routed_total),
                    el("td", w.last_error ? clock(w.last_error_at) + " " + w.last_error : "", "err")]);
    tr.className = "worker";
    tr.dataset.worker = w.id;
    tr.dataset.health = w.health;
    return tr;
  });
  replaceBody("#workers", rows.length ? rows : [row([el("td", "no workers", "empty")])]);
}
function renderErrors(d) {
  const items = d.recent_errors.map((e) => {
    const li = el("li");
    li.append(el("span", clock(e.time), "t"),
              document.createTextNode(e.source + (e.worker ? " " + e.worker : "") + " [" + e.kind + "] " + e.message));
    return li;
  });
  document.getElementById("errors").replaceChildren(...(items.length ? items : [el("li", "none", "empty")]));
}
function setConn(ok, text) {
  const conn = document.getElementById("conn");
  conn.className = ok ? "ok" : "bad";
  conn.textContent = text;
}
async function tick() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 5000);
  try {
    const response = await fetch("cluster?view=overview", {signal: abort.signal, cache: "no-store",
                                                           credentials: "same-origin"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const data = await response.json();
    renderRouter(data); renderPools(data); renderWorkers(data); renderErrors(data);
    document.getElementById("model").textContent = "model " + data.model;
    document.getElementById("updated").textContent = "updated " + clock(data.time);
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    setConn(true, "live (every " + REFRESH_MS / 1000 + " s)");
  } catch (error) {
    setConn(false, "cannot reach the router: " + error.message);
  } finally {
    clearTimeout(timer);
    setTimeout(tick, REFRESH_MS);
  }
}
tick();
</script>
</body>
</html>
"""
