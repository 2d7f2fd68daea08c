"""The router is a light front door: importing it, and building it on a model, loads no
torch (a router container needs no CUDA stack). Each check runs in a fresh interpreter,
since this test process has torch loaded already."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROUTER_MODULES = ["router.server", "router.grpc_server", "router.http_server", "router.service",
                  "router.__main__", "deploy.cli"]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ROUTER_MODULES)
def test_router_module_imports_no_torch(module: str) -> None:
    done = _run(f"import {module}, sys; assert 'torch' not in sys.modules, 'torch was imported'")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("model", ["tiny", "tiny-vlm"])
def test_router_reads_its_model_without_torch(model: str, tiny_model_path: Path) -> None:
    # The cache fixture has written the tiny checkpoints; the router only reads them
    # (config, tokenizer, chat template, multimodal info).
    from engine.model_path import default_vlm_path
    default_vlm_path()
    code = (
        "import sys\n"
        "from router.config import parse_config\n"
        "from router.server import RouterApp\n"
        f"app = RouterApp(parse_config(['--decode', '127.0.0.1:1', '--model', {model!r}]))\n"
        "ids = app.service.encode_chat([{'role': 'user', 'content': 'hi'}])\n"
        "assert ids and app.service.model.max_model_len > 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr


def test_engine_names_still_import() -> None:
    done = _run("from engine import LLM, Engine, SamplingParams, ModelConfig, EngineConfig, InvalidRequestError\n"
                "import engine, sys\n"
                "assert LLM.__module__ == 'engine.llm' and Engine.__module__ == 'engine.engine'\n"
                "assert 'torch' in sys.modules\n"
                "try:\n    engine.NoSuchName\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n")
    assert done.returncode == 0, done.stderr
