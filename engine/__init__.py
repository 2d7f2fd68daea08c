"""The shared inference engine. `from engine import LLM, SamplingParams`."""
from __future__ import annotations

from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.errors import ConfigError, EngineError, InvalidRequestError
from engine.llm import LLM, CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "ConfigError", "Engine", "EngineConfig", "EngineError",
           "InvalidRequestError", "ModelConfig", "RequestOutput", "SamplingParams"]
