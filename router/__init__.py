"""The router: the cluster's front door.

    config.py        RouterConfig (frozen) and add_router_arguments
    server.py        serve(config) / RouterApp: gRPC + HTTP + health monitor on one loop
    grpc_server.py   Router and Registry gRPC services
    http_server.py   OpenAI-compatible HTTP API (FastAPI), /health, /cluster, /dashboard, /metrics
    cluster_view.py  what /cluster and /dashboard show (pools, rates, recent errors)
    dashboard_page.py  the self-contained /dashboard page
    openai_*.py      OpenAI request parsing and response formatting
    service.py       the request flow both front ends share
    dispatch.py      decode stream with retries before the first token, aborts
    registry.py      workers, their channels, the Status-polling health monitor
    worker_state.py  per-worker load, prefix index (from KV events), in-flight leases
    policies.py      routing policies (prefix_aware, load, round_robin, random)
    detokenize.py    incremental text with stop strings
    admission.py     in-flight limit and queue (429)
    metrics.py       Prometheus metrics in a per-router registry
"""
