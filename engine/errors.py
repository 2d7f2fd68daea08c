"""Exceptions the engine raises. Each names the problem in its message."""
from __future__ import annotations


class EngineError(Exception):
    """Base class of every engine error."""


class ConfigError(EngineError):
    """A model directory, config.json or engine option is missing or invalid."""


class InvalidRequestError(EngineError, ValueError):
    """A request (prompt or sampling parameters) cannot be served as given."""
