"""Triton kernels: the GPU path of the engine.

Each module holds one kernel family and a thin launcher with type hints; the torch code
in `engine.models` and `engine.attention.torch_backend` stays the reference they are
checked against (on GPU in bf16, on CPU under TRITON_INTERPRET=1 at tiny sizes).
Importing this package needs triton; nothing in the CPU path imports it.
"""
from __future__ import annotations
