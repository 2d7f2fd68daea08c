"""What a benchmark sends: a list of conversations, each a sequence of turns.

Single-turn workloads are conversations of one turn. Two kinds of prompt:

- token ids (`random`, `shared-prefix`): exact prompt lengths; sent to
  `/v1/completions` as a token list, or as gRPC `token_ids`;
- chat messages (`multi-turn`, `multimodal`, a ShareGPT `--dataset`): sent to
  `/v1/chat/completions`; over gRPC, which has no chat API, the messages are joined into
  one text prompt (`role: text` lines, each image as the model's image token).
  A random chat message has `input_len` words of random letters.

Later turns of a conversation carry the earlier turns and the model's actual replies, so
they hit the prefix cache as a chat client's follow-ups do.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.client.distributions import Distribution

WORKLOADS = ("random", "shared-prefix", "multi-turn", "multimodal")
FIRST_TOKEN_ID = 10  # random prompt ids stay clear of the usual special tokens (0-9 here)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}


class DatasetError(ValueError):
    """A dataset file that cannot be read as ShareGPT-style conversations."""


@dataclass(frozen=True)
class Turn:
    """One request: the user's new message (or the whole prompt, for token ids) and the
    number of tokens to ask for."""

    output_len: int
    token_ids: tuple[int, ...] = ()  # token-id prompts: the whole prompt
    text: str = ""  # chat prompts: the user's message
    images: tuple[bytes, ...] = ()  # PNG bytes, shown before the text


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    system: str = ""  # a system message before the first turn (datasets)

    @property
    def chat(self) -> bool:
        return not self.turns[0].token_ids


@dataclass(frozen=True)
class WorkloadSpec:
    """How to build a workload; `num_requests` counts conversations."""

    kind: str = "random"
    num_requests: int = 100
    input_len: Distribution = field(default_factory=lambda: Distribution.parse("256"))
    output_len: Distribution = field(default_factory=lambda: Distribution.parse("64"))
    seed: int = 0
    vocab: int = 500  # random token ids are drawn from [FIRST_TOKEN_ID, vocab)
    prefix_groups: int = 4
    prefix_len: Distribution = field(default_factory=lambda: Distribution.parse("128"))
    turns: Distribution = field(default_factory=lambda: Distribution.parse("3"))
    images_per_request: int = 1
    image_size: int = 64
    distinct_images: int = 0  # 0: every image differs
    dataset: Path | None = None


def build(spec: WorkloadSpec) -> list[Conversation]:
    """The conversations of `spec`, the same for the same seed."""
    rng = random.Random(spec.seed)
    if spec.dataset is not None:
        return from_dataset(spec, rng)
    if spec.kind == "random":
        return [Conversation((Turn(spec.output_len.sample(rng), _ids(rng, spec.input_len.sample(rng), spec.vocab)),))
                for _ in range(spec.num_requests)]
    if spec.kind == "shared-prefix":
        return _shared_prefix(spec, rng)
    if spec.kind == "multi-turn":
        return [Conversation(tuple(Turn(spec.output_len.sample(rng), text=_words(rng, spec.input_len.sample(rng)))
                                   for _ in range(spec.turns.sample(rng))))
                for _ in range(spec.num_requests)]
    if spec.kind == "multimodal":
        return _multimodal(spec, rng)
    raise ValueError(f"unknown workload {spec.kind!r}; use one of {', '.join(WORKLOADS)}")


def _ids(rng: random.Random, length: int, vocab: int) -> tuple[int, ...]:
    return tuple(rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(length))


def _words(rng: random.Random, count: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(count))


def _shared_prefix(spec: WorkloadSpec, rng: random.Random) -> list[Conversation]:
    """`prefix_groups` prefixes; each request is one of them plus its own suffix of
    `input_len` tokens (a system prompt or few-shot examples shared by many users)."""
    prefixes = [_ids(rng, spec.prefix_len.sample(rng), spec.vocab) for _ in range(spec.prefix_groups)]
    out = []
    for index in range(spec.num_requests):
        prompt = prefixes[index % len(prefixes)] + _ids(rng, spec.input_len.sample(rng), spec.vocab)
        out.append(Conversation((Turn(spec.output_len.sample(rng), prompt),)))
    return out


def _multimodal(spec: WorkloadSpec, rng: random.Random) -> list[Conversation]:
    total = spec.num_requests * spec.images_per_request
    distinct = min(spec.distinct_images or total, total)
    pool = [random_png(rng, spec.image_size) for _ in range(distinct)]
    out = []
    for _ in range(spec.num_requests):
        images = tuple(rng.choice(pool) for _ in range(spec.images_per_request))
        turn = Turn(spec.output_len.sample(rng), text=_words(rng, spec.input_len.sample(rng)), images=images)
        out.append(Conversation((turn,)))
    return out


def random_png(rng: random.Random, size: int) -> bytes:
    """A PNG of `size` x `size` random pixels (compressed fast: noise does not shrink)."""
    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


# -- ShareGPT-style datasets -------------------------------------------------------------


def read_conversations(path: Path) -> list[list[tuple[str, str]]]:
    """(role, text) lists from a JSONL file of `{"conversations": [{"from": "human",
    "value": ...}, {"from": "gpt", ...}]}` (a JSON array of such objects works too).
    Roles are mapped to user / assistant / system; unknown roles are an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from None
    records = _records(text, path)
    out = []
    for where, record in records:
        messages = _messages(record, where)
        if any(role == "user" for role, _ in messages):
            out.append(messages)
    if not out:
        raise DatasetError(f"{path}: no conversation with a human turn")
    return out


def _records(text: str, path: Path) -> list[tuple[str, Any]]:
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not valid JSON: {exc}") from None
        return [(f"{path} item {i}", item) for i, item in enumerate(items)]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON: {exc}") from None
    return records


def _messages(record: Any, where: str) -> list[tuple[str, str]]:
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        raise DatasetError(f"{where}: expected an object with a \"conversations\" list")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) for k in ("from", "value")):
            raise DatasetError(f"{where}: each turn needs string \"from\" and \"value\" fields")
        role = _ROLES.get(turn["from"].lower())
        if role is None:
            raise DatasetError(f"{where}: unknown speaker {turn['from']!r} (use human/gpt/system)")
        if turn["value"].strip():
            out.append((role, turn["value"]))
    return out


def from_dataset(spec: WorkloadSpec, rng: random.Random) -> list[Conversation]:
    """`num_requests` conversations sampled from the dataset (repeated when it has fewer).
    Single-turn: the first human message. `multi-turn`: every human message in order,
    the model's own replies in between. Output lengths come from `output_len`."""
    assert spec.dataset is not None
    dialogues = read_conversations(spec.dataset)
    order = rng.sample(range(len(dialogues)), len(dialogues))
    picked = [dialogues[order[i % len(order)]] for i in range(spec.num_requests)]
    out = []
    for messages in picked:
        system = next((text for role, text in messages if role == "system"), "")
        users = [text for role, text in messages if role == "user"]
        if spec.kind != "multi-turn":
            users = users[:1]
        out.append(Conversation(tuple(Turn(spec.output_len.sample(rng), text=t) for t in users), system))
    return out
