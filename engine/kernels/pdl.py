"""Programmatic dependent launch (Hopper and newer) for the decode chain's kernels.

With PDL a kernel may be launched while the kernel before it on the stream still runs:
its programs start, wait (`griddepcontrol.wait`) until the previous kernel finished and
its writes are visible, then run; each kernel lets its successor launch as soon as all
of its own programs are resident (`griddepcontrol.launch_dependents`). At small batch a
decode step is hundreds of short kernels, and the launch and ramp-up of each is hidden
behind the tail of the one before. Every PDL-launched kernel waits before it touches
memory a predecessor writes, so ordering is as without PDL (transitively too: a kernel
exits only after its own wait returned).

On where the GPU has compute capability >= 9.0, unless `EPD_PDL=0`; the interpreter
and CPU tensors never use it. `EPD_PDL=0 python -m bench.engine_bench` measures without.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl


@lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on `t`'s device launch with PDL (read per call: benchmarks flip it)."""
    if not t.is_cuda or os.environ.get("EPD_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capable(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch(t: torch.Tensor) -> dict[str, object]:
    """Keyword arguments for a Triton launch (`kernel[grid](..., USE_PDL=..., **rest)`)."""
    on = enabled(t)
    return {"USE_PDL": on, "launch_pdl": True} if on else {"USE_PDL": False}


@triton.jit
def wait_and_release(USE_PDL: tl.constexpr):
    """At a kernel's start: wait for the previous kernel, then let the next one launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


__all__ = ["enabled", "launch", "wait_and_release"]
