"""Shared fixtures: the tiny model in a per-session cache, and checkpoints of each
architecture written by transformers' own save_pretrained."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("EPD_CACHE_DIR", str(tmp_path_factory.mktemp("epd-cache")))


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from engine.model_path import default_model_path
    return default_model_path()
