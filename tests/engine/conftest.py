"""Without CUDA, Triton kernels run under the interpreter: set it before triton loads."""
from __future__ import annotations

import os

import torch


def _patch_interpreter_scalars() -> None:
    """triton's interpreter holds scalars as 1-element arrays and converts them with
    int(), which numpy >= 2.4 refuses; loop bounds loaded from memory then fail. Convert
    through the element instead (test-only: the GPU path has no interpreter)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor: type, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _patch_interpreter_scalars()
