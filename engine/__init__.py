"""The shared inference engine. `from engine import LLM, SamplingParams`.

The names below load on first use (PEP 562), so `import engine.tokenizer` and the other
torch-free modules the router shares with the engine (tokenizer, sampling_params,
radix_cache's page hashes, multimodal, config, errors, model_path) never pull in torch;
`Engine` and `LLM` do."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.config import EngineConfig, ModelConfig
    from engine.engine import Engine
    from engine.errors import ConfigError, EngineError, InvalidRequestError
    from engine.llm import LLM, CompletionOutput, RequestOutput
    from engine.sampling_params import SamplingParams

_HOMES = {
    "LLM": "engine.llm", "CompletionOutput": "engine.llm", "RequestOutput": "engine.llm",
    "Engine": "engine.engine",
    "EngineConfig": "engine.config", "ModelConfig": "engine.config",
    "ConfigError": "engine.errors", "EngineError": "engine.errors", "InvalidRequestError": "engine.errors",
    "SamplingParams": "engine.sampling_params",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
