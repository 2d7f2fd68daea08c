"""Where one attempt of a request goes: a decode worker, the prefill workers it should
try, the encode workers per image, and the router-side bookkeeping that goes with them
(leases on the in-flight counters, circuit-breaker probes), released exactly once."""
from __future__ import annotations

import grpc

from router.policies import RouteRequest
from router.registry import WorkerHandle
from router.worker_state import Lease, WorkerState


class Plan:
    def __init__(self, decode: WorkerHandle, prefill: list[WorkerHandle], route: RouteRequest,
                 encoders: list[list[WorkerHandle]] | None = None) -> None:
        self.decode = decode
        self.prefill = prefill
        self.encoders = encoders or []  # per image, the encode workers to try in order
        self.call: grpc.aio.UnaryStreamCall | None = None
        self._leases: list[Lease] = [decode.state.lease()]
        if prefill:
            first = prefill[0].state
            page_size = first.load.page_size
            predicted = route.page_hashes(page_size) if page_size > 0 else []
            self._leases.append(first.lease(route.uncached_tokens(first), predicted))
        # Each image counts on its first encoder until the prompt is computed.
        self._encoding = [candidates[0].state for candidates in self.encoders if candidates]
        for state in self._encoding:
            state.inflight_images += 1
        # Workers whose half-open breaker let this attempt be their one probe call.
        probes = [(h.state, h.state.breaker.begin()) for h in [decode, *prefill]]
        self._probes: list[tuple[WorkerState, int]] = [(s, p) for s, p in probes if p is not None]

    @property
    def decode_id(self) -> str:
        return self.decode.state.id

    def prefill_done(self) -> None:
        for lease in self._leases:
            lease.prefill_done()
        for state in self._encoding:
            state.inflight_images -= 1
        self._encoding = []

    def release(self) -> None:
        self.prefill_done()
        for lease in self._leases:
            lease.close()
        for state, probe in self._probes:  # a probe that got no outcome (went unused, or the client left)
            state.breaker.end_probe(probe)
        self._probes = []

    def cancel(self) -> None:
        if self.call is not None:
            self.call.cancel()
