"""The drafter interface and its registry.

A drafter proposes up to `limit` tokens after a request's known tokens. Invariant: a
drafter never changes the request; whatever state it keeps (a draft model's KV) is its
own and is rebuilt from the request's tokens, so a rejected proposal needs no undo
beyond what the drafter checks itself on the next call.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from engine.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from engine.config import EngineConfig, ModelConfig
    from engine.request import Request
    from engine.tokenizer import Tokenizer


class Drafts(NamedTuple):
    """A proposal for one request. `probs` [len(token_ids), vocab]: the distribution each
    token was drawn from; None: the tokens are deterministic (a point mass each), which
    is what rejection sampling then assumes."""

    token_ids: list[int]
    probs: torch.Tensor | None = None


NO_DRAFTS = Drafts([])


@dataclass(frozen=True)
class DrafterSetup:
    """What a drafter may build itself from (the engine's config, model and device)."""

    config: EngineConfig
    model_config: ModelConfig
    model_path: Path
    tokenizer: Tokenizer
    device: torch.device


class Drafter(ABC):
    name: ClassVar[str] = ""

    def __init__(self, setup: DrafterSetup) -> None:
        self.setup = setup

    @abstractmethod
    def propose(self, requests: list[Request], limits: list[int]) -> list[Drafts]:
        """One proposal per request (in order), at most limits[i] tokens each. Every
        request is decoding: all its known tokens but the last are computed."""

    def release(self, request: Request) -> None:
        """The request is done here (finished, aborted, moved away): drop its state."""

    def free_pages(self) -> int | None:
        """Free pages of the drafter's own KV pool (None: it keeps no KV)."""
        return None

    def total_pages(self) -> int | None:
        return None


_REGISTRY: dict[str, type[Drafter]] = {}


def register_drafter(cls: type[Drafter]) -> type[Drafter]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # Importing the modules registers them; deferred so that engine.config stays torch-free.
    from engine.spec import draft_model, ngram  # noqa: F401


def drafter_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create_drafter(setup: DrafterSetup) -> Drafter:
    _load_builtin()
    name = setup.config.speculative
    if name not in _REGISTRY:
        raise ConfigError(f"unknown speculative method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](setup)
