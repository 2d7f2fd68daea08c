"""Where a model lives: a checkpoint directory by path, or a built-in tiny model in the
cache directory. Torch-free, so the router resolves and reads a model without loading
torch; only writing a built-in checkpoint the first time (seeded random weights) does."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from engine.errors import ConfigError


def cache_dir() -> Path:
    return Path(os.environ.get("EPD_CACHE_DIR", Path.home() / ".cache" / "epd-serve"))


def _cached(name: str, create: Callable[[Path], object]) -> Path:
    """The checkpoint `name` in the cache directory, written by `create` on first use,
    atomically: processes starting together never see a half-written directory."""
    target = cache_dir() / name
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    create(staging)
    try:
        os.rename(staging, target)
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_tiny(directory: Path) -> None:
    from engine.tiny import create_tiny_model  # torch: only when the checkpoint is written

    create_tiny_model(directory)


def default_model_path() -> Path:
    """The built-in tiny model, created in the cache directory on first use."""
    return _cached("tiny-llama", _write_tiny)


def default_vlm_path(vision: str = "clip") -> Path:
    """The built-in tiny VLM (`vision`: clip or siglip), created on first use."""
    def write(directory: Path) -> None:
        from engine.tiny_vlm import create_tiny_vlm  # torch: only when the checkpoint is written

        create_tiny_vlm(directory, vision)

    return _cached(f"tiny-llava-{vision}", write)


def resolve_model_path(model: str | Path | None) -> Path:
    """`None` means the built-in tiny model (created in the cache on first use);
    "tiny-vlm" the built-in tiny vision-language model."""
    if model is None or str(model) in ("", "tiny"):
        return default_model_path()
    if str(model) == "tiny-vlm":
        return default_vlm_path()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model directory not found: {model}")
    return path
