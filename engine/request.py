"""A request's state inside one engine.

Ownership: the scheduler owns `num_computed_tokens`, `pages` and `prefix_nodes`; the
engine owns `output_token_ids`, `logprobs`, `status` and `finish_reason`.
Invariant: pages[i] holds the KV of tokens [i * page_size, (i + 1) * page_size).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from engine.multimodal import ImageInput, cache_keys
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    pages: list[int] = field(default_factory=list)
    prefix_nodes: list[Any] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    output_text: str = ""
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    # Output tokens the request arrived with (a request migrated from another worker,
    # resumed here): they count as output for every stop rule, penalty and seed.
    num_resumed_tokens: int = 0
    # Prefill role: when the request finishes, keep its pages (out of the scheduler)
    # until the owner has shipped them and calls Engine.release_held.
    hold_pages: bool = False
    # Decode role: the session this request is a turn of ("" for none); its KV stays
    # with the session when it finishes (engine/sessions.py).
    session_id: str = ""
    # Speculation (engine/spec/): tokens proposed after the known ones, set by the
    # engine's Speculation before a step is scheduled and cleared when it is processed
    # (the scheduler may shorten the list to its budget). Never part of num_tokens; the
    # runner feeds them after the last known token.
    draft_token_ids: list[int] = field(default_factory=list)
    # Images of the prompt, in prompt order, each with its embedding (or only its hash
    # where the KV comes from elsewhere). The prefix cache sees `prompt_cache_keys`:
    # the prompt with image positions keyed by image hash (the prompt itself if none).
    images: tuple[ImageInput, ...] = ()
    prompt_cache_keys: list[int] = field(init=False, repr=False)
    images_end: int = field(init=False, repr=False)  # first position after the last image
    # params.plain_greedy, read once (params never change): the overlap scheduler asks
    # for every row of every step.
    plain_greedy: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.plain_greedy = self.params.plain_greedy
        self.images = tuple(self.images)
        self.prompt_cache_keys = (cache_keys(self.prompt_token_ids, self.images) if self.images
                                  else self.prompt_token_ids)
        self.images_end = self.images[-1].end if self.images else 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def cache_token_ids(self) -> list[int]:
        """all_token_ids as the prefix cache keys them (image positions by image hash)."""
        return self.prompt_cache_keys + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
