"""The launcher's control endpoint: the router (router/pools.py) asks the process that
started the cluster (`epd up`, local or Ray) to start or stop workers.

    POST   /workers        {"role": "decode"}  -> {"id": "decode-2"}   (started, not yet ready)
    DELETE /workers/ID                         -> {"stopped": true}    (after its drain)
    GET    /workers                            -> {"workers": [{"id", "role", "alive"}, ...]}

It listens on the launcher's host with a port of its own; with a cluster token the
header `x-epd-cluster-token` must carry it. Bodies are small JSON objects, parsed with
json (nothing else is ever decoded from the network).
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

log = logging.getLogger("deploy.launcher")
ROLES = ("encode", "prefill", "decode")
MAX_BODY = 4096


class LaunchError(Exception):
    """A start or stop the backend cannot carry out (answered 400/404)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Backend(Protocol):
    def add_worker(self, role: str) -> str: ...
    def remove_worker(self, worker_id: str) -> None: ...
    def worker_list(self) -> list[dict[str, Any]]: ...


class LauncherServer:
    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None) -> None:
        self._server = ThreadingHTTPServer((host, port), _handler(backend, token))
        self._server.daemon_threads = True
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="launcher", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(backend: Backend, token: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._serve(lambda: {"workers": backend.worker_list()} if self.path == "/workers" else None)

        def do_POST(self) -> None:  # noqa: N802
            self._serve(lambda: {"id": backend.add_worker(self._role())} if self.path == "/workers" else None)

        def do_DELETE(self) -> None:  # noqa: N802
            prefix = "/workers/"
            if not self.path.startswith(prefix):
                return self._serve(lambda: None)
            self._serve(lambda: (backend.remove_worker(self.path[len(prefix):]), {"stopped": True})[1])

        def _role(self) -> str:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise LaunchError("body too large")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as exc:
                raise LaunchError(f"the body is not JSON: {exc}") from None
            role = body.get("role") if isinstance(body, dict) else None
            if role not in ROLES:
                raise LaunchError(f"'role' must be one of {ROLES}, got {role!r}")
            return str(role)

        def _serve(self, action: Any) -> None:
            if token and not hmac.compare_digest(self.headers.get("x-epd-cluster-token", "").encode(),
                                                 token.encode()):
                return self._reply(401, {"error": "missing or wrong cluster token"})
            try:
                body = action()
            except LaunchError as exc:
                return self._reply(exc.status, {"error": str(exc)})
            except Exception as exc:  # noqa: BLE001 - answered, logged; the launcher keeps running
                log.exception("launcher: %s %s", self.command, self.path)
                return self._reply(500, {"error": repr(exc)})
            if body is None:
                return self._reply(404, {"error": f"no route {self.command} {self.path}"})
            self._reply(200, body)

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("launcher: " + format, *args)

    return Handler
