"""A small stand-in for the Kubernetes API server's pod endpoints, served over real HTTP
from a thread: list and watch of `/api/v1/namespaces/NS/pods` with label selectors
(equality terms only), resourceVersions, bookmarks, `timeoutSeconds`, and `410 Gone`
for a version older than the compacted history.

Tests change pods through `put_pod` / `set_ready` / `delete_pod` (each a new
resourceVersion and a watch event, as the real server does) and `compact()` (history
dropped: watches from older versions get an ERROR event with code 410).
"""
from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


Event = tuple[int, str, dict[str, Any]]  # (resourceVersion, type, pod)


def make_pod(name: str, labels: dict[str, str], ip: str, grpc_port: int, ready: bool = False,
             namespace: str = "test") -> dict[str, Any]:
    status = "True" if ready else "False"
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {"containers": [{"name": "worker", "ports": [
            {"name": "grpc", "containerPort": grpc_port}, {"name": "metrics", "containerPort": 9090}]}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": status}]},
    }


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key) != value.lstrip("="):
            return False
    return True


@dataclass
class Requests:
    """What clients asked for (tests check the protocol was followed)."""

    lists: int = 0
    watches: list[str] = field(default_factory=list)  # resourceVersion of each watch
    token: list[str] = field(default_factory=list)


class FakeKube:
    def __init__(self, namespace: str = "test", bookmark_interval_s: float = 0.5) -> None:
        self.namespace = namespace
        self.bookmark_interval_s = bookmark_interval_s
        self.requests = Requests()
        self._pods: dict[str, dict[str, Any]] = {}
        self._events: list[Event] = []
        self._rv = 100
        self._oldest_rv = 100  # watches from an older version get 410
        self._compactions = 0
        self._cond = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._closing = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeKube:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()

    # -- changes -----------------------------------------------------------------------

    def _record(self, kind: str, pod: dict[str, Any]) -> None:
        self._rv += 1
        pod["metadata"]["resourceVersion"] = str(self._rv)
        self._events.append((self._rv, kind, copy.deepcopy(pod)))
        self._cond.notify_all()

    def put_pod(self, pod: dict[str, Any]) -> None:
        with self._cond:
            name = pod["metadata"]["name"]
            kind = "MODIFIED" if name in self._pods else "ADDED"
            self._pods[name] = copy.deepcopy(pod)
            self._record(kind, self._pods[name])

    def set_ready(self, name: str, ready: bool) -> None:
        with self._cond:
            pod = self._pods[name]
            pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
            self._record("MODIFIED", pod)

    def delete_pod(self, name: str) -> None:
        with self._cond:
            self._record("DELETED", self._pods.pop(name))

    def compact(self) -> None:
        """Forget the history and end every open watch: resuming needs a new list."""
        with self._cond:
            self._rv += 1
            self._oldest_rv = self._rv
            self._events.clear()
            self._compactions += 1
            self._cond.notify_all()

    # -- serving -----------------------------------------------------------------------

    def _list_body(self, selector: str) -> dict[str, Any]:
        with self._cond:
            self.requests.lists += 1
            items = [copy.deepcopy(p) for p in self._pods.values()
                     if selector_matches(selector, p["metadata"]["labels"])]
            return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)},
                    "items": items}

    def _next_events(self, after: int, selector: str, timeout_s: float) -> tuple[list[Event], int]:
        """Events after `after` for this selector, and the version they bring the watch to."""
        with self._cond:
            self._cond.wait_for(lambda: self._closing or self._rv > after, timeout=timeout_s)
            events = [e for e in self._events
                      if e[0] > after and selector_matches(selector, e[2]["metadata"]["labels"])]
            return events, self._rv

    def _watch(self, handler: BaseHTTPRequestHandler, selector: str, rv: int, timeout_s: float) -> None:
        with self._cond:
            self.requests.watches.append(str(rv))
            gone, compactions = rv < self._oldest_rv, self._compactions
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        if gone:
            _write_line(handler, {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                             "message": f"too old resource version: {rv}"}})
            return
        end, last_bookmark, sent = time.monotonic() + timeout_s, time.monotonic(), rv
        while time.monotonic() < end and not self._closing and self._compactions == compactions:
            events, current = self._next_events(rv, selector, min(0.1, self.bookmark_interval_s))
            for event_rv, kind, pod in events:
                _write_line(handler, {"type": kind, "object": pod})
                sent = event_rv
            rv = current  # every event up to `current` of this selector was written
            if time.monotonic() - last_bookmark >= self.bookmark_interval_s and rv > sent:
                _write_line(handler, {"type": "BOOKMARK", "object": {
                    "kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}}})
                last_bookmark, sent = time.monotonic(), rv

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        kube = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a watch body ends when the connection closes

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                kube.requests.token.append(self.headers.get("Authorization", ""))
                if url.path != f"/api/v1/namespaces/{kube.namespace}/pods":
                    self.send_error(404)
                    return
                selector = query.get("labelSelector", "")
                try:
                    if query.get("watch") in ("true", "1"):
                        kube._watch(self, selector, int(query.get("resourceVersion") or 0),
                                    float(query.get("timeoutSeconds", "30")))
                    else:
                        body = json.dumps(kube._list_body(selector)).encode()
                        self.send_response(200)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler


def _write_line(handler: BaseHTTPRequestHandler, event: dict[str, Any]) -> None:
    handler.wfile.write(json.dumps(event).encode() + b"\n")
    handler.wfile.flush()
