"""Liveness of every channel between cluster components (router → workers, decode →
prefill, prefill → encode, workers → the router's registry): HTTP/2 keepalive, and fast
reconnection.

A peer that stops answering without closing its sockets (a frozen process, a host gone,
a partition) fails the calls running on its channel with UNAVAILABLE within
PING_INTERVAL_MS + PING_TIMEOUT_MS (8 s), instead of after their deadlines (minutes
for a decode stream): the caller then retries or migrates the work elsewhere. Pings go
only while calls are open. TCP keepalive would not see a frozen process (its kernel
still answers); an HTTP/2 ping needs the process itself.
"""
from __future__ import annotations

PING_INTERVAL_MS = 4000
PING_TIMEOUT_MS = 4000

CLIENT_OPTIONS: list[tuple[str, int]] = [
    # A restarted peer is dialled again within a second: gRPC's default backoff grows
    # to 2 minutes, during which every call fails at once and the peer, although back,
    # stays unused (a decode worker would skip a restarted prefill worker that long).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", PING_INTERVAL_MS),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    # A long prefill or a slow first token sends no data for a while: keep pinging.
    ("grpc.http2.max_pings_without_data", 0),
]

# Servers of cluster components accept the clients' pings (gRPC's default policy
# answers pings more frequent than every 5 minutes with GOAWAY).
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", PING_INTERVAL_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
]
