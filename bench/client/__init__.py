"""The benchmark client behind `epd bench` (and bench/serving_bench.py): workloads,
HTTP and gRPC transports, open- and closed-loop runners, summaries and plots.

    distributions.py  length distributions parsed from flags (fixed, uniform, normal, ...)
    workloads.py      conversations to send: random, shared-prefix, multi-turn, multimodal, ShareGPT
    transport.py      one streamed request over HTTP (OpenAI API) or gRPC, timed
    runner.py         Poisson arrivals or fixed concurrency, progress bar
    report.py         percentiles, throughput, goodput under SLOs, JSON
    plots.py          latency CDFs, throughput and SLO attainment against rate (matplotlib)
    cli.py            `epd bench`
"""
