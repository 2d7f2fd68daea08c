"""One step's inputs, from rank 0 to the other ranks, as tensors only (nothing pickled).

Rank 0 fills the Batch (ModelRunner.prepare) and broadcasts, in this order:

1. control: header int64[8] = (op, tokens T, sequences B, logits rows L, pages P,
   image rows R, embedding width E, 0);
2. host: int64[3B + P] = query_lens, seq_lens, page counts, page ids (the followers'
   attention backends read lengths and page ids on the host, as rank 0's do);
3. device: int64[3T + L + R] = input_ids, positions, slot_mapping, logits_indices,
   image_rows;
4. device, when R > 0: the image embeddings [R, E] in the model's dtype.

A follower builds the same Batch from them and runs the same forward; its collectives
(all-reduces, the logits gather) pair with rank 0's in order. STOP ends the follower.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from engine.batch import Batch, ScheduledRequest
from engine.parallel.comm import TPGroup

HEADER_SIZE = 8


class Op(IntEnum):
    STEP = 1
    STOP = 2


@dataclass(slots=True)
class PagesOnly:
    """What a follower knows of a scheduled request: the page ids of its sequence (the
    one field of a request that attention backends read)."""

    pages: list[int]


def send_stop(group: TPGroup) -> None:
    group.broadcast_control(_header(Op.STOP))


def send_step(group: TPGroup, batch: Batch, page_size: int, dtype: torch.dtype) -> None:
    """Rank 0, after ModelRunner.prepare(batch)."""
    rows = [-(-seq_len // page_size) for seq_len in batch.seq_lens]
    pages = [p for item, count in zip(batch.scheduled, rows) for p in item.request.pages[:count]]
    images = batch.image_rows if batch.image_rows is not None else batch.input_ids[:0]
    embeds = batch.image_embeds
    width = 0 if embeds is None else embeds.shape[1]
    group.broadcast_control(_header(Op.STEP, batch.input_ids.shape[0], len(rows), batch.logits_indices.shape[0],
                                    len(pages), images.shape[0], width))
    group.broadcast_host(torch.tensor([*batch.query_lens, *batch.seq_lens, *rows, *pages], dtype=torch.long))
    group.broadcast_device(torch.cat([batch.input_ids, batch.positions, batch.slot_mapping,
                                      batch.logits_indices, images]))
    if embeds is not None:
        group.broadcast_device(embeds.to(dtype).contiguous())


def receive_step(group: TPGroup, dtype: torch.dtype) -> Batch | None:
    """A follower: the next step's Batch, or None when rank 0 says stop."""
    header = _header(Op.STOP)
    group.broadcast_control(header)
    op, tokens, seqs, logits, num_pages, images, width, _ = header.tolist()
    if op == Op.STOP:
        return None
    host = torch.empty(3 * seqs + num_pages, dtype=torch.long)
    group.broadcast_host(host)
    device = group.device
    flat = torch.empty(3 * tokens + logits + images, dtype=torch.long, device=device)
    group.broadcast_device(flat)
    embeds = None
    if width:
        embeds = torch.empty(images, width, dtype=dtype, device=device)
        group.broadcast_device(embeds)
    return _batch(host.numpy(), flat, seqs, tokens, logits, embeds)


def _batch(host: np.ndarray, flat: torch.Tensor, seqs: int, tokens: int, logits: int,
           embeds: torch.Tensor | None) -> Batch:
    query_lens, seq_lens, rows = (host[i * seqs:(i + 1) * seqs].tolist() for i in range(3))
    pages = host[3 * seqs:]
    starts = np.cumsum([0, *rows])
    scheduled = [ScheduledRequest(PagesOnly(pages[a:b].tolist()), q, False)  # type: ignore[arg-type]
                 for a, b, q in zip(starts[:-1], starts[1:], query_lens)]
    device_pages = torch.from_numpy(pages).to(flat.device)
    ids, positions, slots, logits_indices, image_rows = flat.split([tokens, tokens, tokens, logits,
                                                                    flat.shape[0] - 3 * tokens - logits])
    return Batch(scheduled, input_ids=ids, positions=positions, slot_mapping=slots, query_lens=query_lens,
                 seq_lens=seq_lens, page_tables=list(device_pages.split(rows)), logits_indices=logits_indices,
                 image_rows=image_rows if embeds is not None else None, image_embeds=embeds)


def _header(op: Op, *sizes: int) -> torch.Tensor:
    header = torch.zeros(HEADER_SIZE, dtype=torch.long)
    header[0] = int(op)
    header[1:1 + len(sizes)] = torch.tensor(sizes, dtype=torch.long)
    return header
