"""Prompt lookup: propose the tokens that followed the most recent earlier occurrence
of the request's last n tokens (n from `speculative_ngram_max` down to 1) that is
followed by a full draft, else the occurrence followed by the most tokens."""
from __future__ import annotations

import numpy as np

from engine.request import Request
from engine.spec.drafter import NO_DRAFTS, Drafter, Drafts, register_drafter


def lookup(tokens: np.ndarray, max_n: int, limit: int) -> list[int]:
    """Up to `limit` tokens following an earlier match of the longest suffix n-gram
    (n <= max_n) of `tokens`; [] when no suffix recurs. Of that n-gram's matches, the
    latest one with `limit` tokens after it, else the earliest (the most tokens after it):
    in a run or a short cycle the latest match lies just behind the end, and its
    continuation would be a token or two."""
    length = tokens.shape[0]
    for n in range(min(max_n, length - 1), 0, -1):
        suffix = tokens[length - n:]
        # Windows starting at 0 .. length - n - 1: every earlier occurrence.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.shape[0]:
            full = hits[hits + n + limit <= length]
            start = int(full[-1] if full.shape[0] else hits[0]) + n
            return tokens[start:start + limit].tolist()
    return []


@register_drafter
class NgramDrafter(Drafter):
    name = "ngram"

    def propose(self, requests: list[Request], limits: list[int]) -> list[Drafts]:
        max_n = self.setup.config.speculative_ngram_max
        out = []
        for request, limit in zip(requests, limits):
            if limit <= 0:
                out.append(NO_DRAFTS)
                continue
            tokens = np.asarray(request.all_token_ids, dtype=np.int64)
            out.append(Drafts(lookup(tokens, max_n, limit)))
        return out
