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


@pytest.fixture(scope="session")
def loopy_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with weak attention: n-gram speculation accepts part of its output."""
    from tests.engine.spec_models import write_loopy
    return write_loopy(tmp_path_factory.mktemp("loopy"))


@pytest.fixture(scope="session")
def small_draft_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer draft model with the tiny tokenizer."""
    from tests.engine.spec_models import write_small_draft
    return write_small_draft(tmp_path_factory.mktemp("small-draft"))
