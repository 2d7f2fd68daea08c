"""Image embeddings between encode and prefill workers: the region, its slots, its
compatibility hash, and the embedding cache both sides keep.

An embedding buffer is a region of `slots` pages, each page one image's embeddings
`[num_image_tokens, hidden]` in the language model's dtype: an encode worker writes one
image into one of the prefill worker's slots, fenced by a room exactly as KV pages are.
The region lives in a transfer backend of its own (the KV backend's compatibility hash
describes KV pages; this one describes embeddings), so a KV peer can never write here.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import torch

from engine.multimodal import MultimodalInfo
from kv_transfer import compat_hash

EMB_REGION = "emb"


def embedding_compat_hash(model_path: str | Path, info: MultimodalInfo, dtype: str) -> str:
    """Encoder and prefill must agree on the vision tower, projector, image token count,
    hidden size and dtype; the checkpoint's location does not matter, its config does."""
    raw = json.loads((Path(model_path) / "config.json").read_text())
    vision = json.dumps(raw.get("vision_config", {}), sort_keys=True)
    projector = json.dumps({k: raw.get(k) for k in sorted(raw) if "projector" in k or k.startswith("vision_")},
                           sort_keys=True)
    return compat_hash(kind="image-embeddings", vision=hashlib.sha256(vision.encode()).hexdigest(),
                       projector=projector, num_image_tokens=info.num_image_tokens,
                       hidden_size=info.hidden_size, dtype=dtype)


def embedding_buffer(info: MultimodalInfo, slots: int, dtype: torch.dtype,
                     device: torch.device | str) -> torch.Tensor:
    """[slots, num_image_tokens, hidden]: page i of the region is slot i."""
    return torch.zeros(slots, info.num_image_tokens, info.hidden_size, dtype=dtype, device=device)


class SlotPool:
    """Free slots of an embedding buffer. Owned by one event loop."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("an embedding buffer needs at least one slot")
        self.total = slots
        self._free: list[int] = list(range(slots - 1, -1, -1))
        self._available = asyncio.Condition()

    @property
    def free(self) -> int:
        return len(self._free)

    async def acquire(self, timeout: float) -> int:
        """A free slot; asyncio.TimeoutError when none frees up within `timeout`."""
        async with asyncio.timeout(timeout):
            async with self._available:
                await self._available.wait_for(lambda: bool(self._free))
                return self._free.pop()

    async def release(self, slot: int) -> None:
        async with self._available:
            if slot in self._free:
                raise AssertionError(f"embedding slot {slot} released twice")
            self._free.append(slot)
            self._available.notify()


class EmbeddingCache:
    """Embeddings by image hash, least recently used evicted first, bounded in bytes.
    Entries are never modified in place (callers copy out of transfer slots first)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = max(0, capacity_bytes)
        self.bytes = 0
        self.hits_total = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        tensor = self._entries.get(key)
        if tensor is not None:
            self._entries.move_to_end(key)
            self.hits_total += 1
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if size > self.capacity_bytes or key in self._entries:
            return
        self._entries[key] = tensor
        self.bytes += size
        while self.bytes > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        self.bytes = 0
        return count
