"""A tensor-parallel rank other than 0: `python -m engine.parallel.follower`, started by
rank 0 (engine.parallel.launch), never by hand.

Its first stdin line is its spec (JSON: rank, size, the store's port, the model
directory, the engine config, the memfd of its KV cache on CPU). It builds its shard
and its KV cache, then runs every step rank 0 broadcasts until STOP. It owns no
scheduler, no sampler and no server. It exits when rank 0 is gone: stdin reaching EOF
means rank 0 closed it or died, and then nobody will send a step again.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.attention import create_attention_backend
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.parallel.comm import TPGroup
from engine.parallel.launch import START_TIMEOUT_S, config_from_json, cpu_threads, kv_shape, map_shared, rank_devices
from engine.parallel.layout import TPLayout
from engine.parallel.model import load_shard
from engine.parallel.runner import serve_steps

logger = logging.getLogger("engine.parallel.follower")


def _watch_rank0(stopping: threading.Event) -> None:
    # Raw reads of fd 0 (the buffered stdin's lock would block interpreter shutdown).
    while os.read(0, 4096):
        pass  # rank 0 writes nothing after the spec line: only EOF ends this
    if not stopping.is_set():
        print("tensor-parallel follower: rank 0 is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)


def run(spec: dict[str, Any]) -> int:
    rank, size = int(spec["rank"]), int(spec["size"])
    config = config_from_json(spec["config"])
    model_path = Path(spec["model"])
    model_config = ModelConfig.from_pretrained(model_path, config.dtype)
    layout = TPLayout.of(model_config, size)
    device = rank_devices(config.device, size)[rank]
    if device.type == "cpu":  # the ranks share the host's cores
        torch.set_num_threads(cpu_threads(size))
    else:
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", int(spec["store_port"]), size, False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    store.set(f"joined/{rank}", "1")
    group = TPGroup(store, rank, size, device, config.tensor_parallel_timeout_s)
    torch.manual_seed(config.seed)
    model = load_shard(model_path, model_config, layout, group, device, config.load_format, config.seed)
    shape = kv_shape(model_config, layout, config)
    if spec.get("kv_fd") is not None:
        kv_cache = KVCache.over(map_shared(int(spec["kv_fd"]), shape, model_config.torch_dtype), config.page_size)
        os.close(int(spec["kv_fd"]))  # the mapping stays
    else:
        kv_cache = KVCache(layout.local_model_config(model_config), config.num_pages, config.page_size, device,
                           model_config.torch_dtype)
    assert config.max_model_len is not None
    model.rotary.build_table(config.max_model_len, model_config.torch_dtype)
    attention = create_attention_backend(config.attention_backend)(kv_cache, model_config.head_dim**-0.5)
    if config.uses_triton_kernels:
        from engine.kernels.ops import TRITON_OPS
        model.use_ops(TRITON_OPS)
    store.set(f"ready/{rank}", "1")
    steps = serve_steps(group, model, attention)
    logger.info("tensor-parallel rank %d stopping after %d steps", rank, steps)
    return 0


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which stops us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tp-follower %(levelname)s %(name)s: %(message)s")
    spec = json.loads(sys.stdin.buffer.readline())
    stopping = threading.Event()
    threading.Thread(target=_watch_rank0, args=(stopping,), name="rank0-watch", daemon=True).start()
    try:
        code = run(spec)
    except Exception:  # noqa: BLE001 - say why on stderr; rank 0 sees the exit
        logger.exception("tensor-parallel rank %s failed", spec.get("rank"))
        code = 1
    stopping.set()
    return code


if __name__ == "__main__":
    exit_code = main()
    # Nothing to clean up (the OS closes the sockets and unmaps the KV memfd); skipping the
    # interpreter's teardown of torch makes the worker's stop seconds faster.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
