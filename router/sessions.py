"""Sessions as the router sees them: where each session's turns go.

A request with a `session_id` opens the session (or continues it). The dispatcher sends
its turns to the session's decode worker, with its prefill worker first among the
prefill candidates, while they are routable; otherwise the policy picks new ones and
the session follows them (a worker that died ends its sessions there: the next turn is
served elsewhere, with a full prefill, never refused). The decode worker keeps each
turn's KV for the next one (engine/sessions.py).

Bounded like the workers' side: at most `max_sessions` (the least recently used is
forgotten), each forgotten `idle_timeout` seconds after its last turn. Forgetting a
session here tells no worker: each worker releases its holds on its own timeout, cap
and memory pressure; closing one (`DELETE /v1/sessions/{id}`, gRPC `CloseSession`) also
tells its decode worker.

The directory is this router's own: with several routers, a session's turns keep their
worker only while one router serves them (another router routes them by its policy).
Owned by the router's event loop (no locks).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from engine.errors import InvalidRequestError
from engine.sessions import check_session_id
from router.errors import InvalidRequest


@dataclass
class SessionRoute:
    session_id: str
    created: float
    last_use: float
    decode_id: str = ""  # the decode worker that holds (or will hold) its KV; "" before a turn
    prefill_id: str = ""
    turns: int = 0
    moves: int = 0  # times its turns had to go to another decode worker

    def describe(self, now: float) -> dict[str, object]:
        return {"id": self.session_id, "object": "session", "decode_worker": self.decode_id or None,
                "prefill_worker": self.prefill_id or None, "turns": self.turns, "moves": self.moves,
                "idle_s": round(now - self.last_use, 3)}


def parse_session_id(value: object, param: str = "session_id") -> str:
    """A client's session id, or InvalidRequest (400 / INVALID_ARGUMENT) naming the problem."""
    try:
        return check_session_id(value)
    except InvalidRequestError as exc:
        raise InvalidRequest(str(exc), param=param) from None


class SessionDirectory:
    def __init__(self, max_sessions: int, idle_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.clock = clock
        self._routes: OrderedDict[str, SessionRoute] = OrderedDict()  # least recently used first
        self.moves_total = 0

    def __len__(self) -> int:
        self.expire()
        return len(self._routes)

    def get(self, session_id: str) -> SessionRoute | None:
        self.expire()
        return self._routes.get(session_id)

    def open(self, session_id: str) -> SessionRoute:
        """The session's route, created if new, as just used (a turn starts)."""
        self.expire()
        now = self.clock()
        route = self._routes.pop(session_id, None) or SessionRoute(session_id, now, now)
        route.last_use = now
        self._routes[session_id] = route
        while len(self._routes) > self.max_sessions:
            self._routes.popitem(last=False)
        return route

    def touch(self, session_id: str) -> None:
        """A turn ended: its idle time starts now."""
        route = self._routes.get(session_id)
        if route is not None:
            route.last_use = self.clock()
            self._routes.move_to_end(session_id)

    def follow(self, route: SessionRoute, decode_id: str, prefill_id: str) -> str:
        """The session's turns now go to these workers; returns the decode worker it
        left ("" when it stayed or had none), whose kept KV is no use any more."""
        left = route.decode_id if route.decode_id and route.decode_id != decode_id else ""
        if left:
            route.moves += 1
            self.moves_total += 1
        route.decode_id, route.prefill_id = decode_id, prefill_id
        return left

    def close(self, session_id: str) -> SessionRoute | None:
        self.expire()
        return self._routes.pop(session_id, None)

    def expire(self) -> None:
        deadline = self.clock() - self.idle_timeout
        while self._routes:
            route = next(iter(self._routes.values()))
            if route.last_use > deadline:
                return
            del self._routes[route.session_id]
