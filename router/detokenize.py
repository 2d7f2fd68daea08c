"""Token ids to streamed text: incremental detokenizing that never splits a UTF-8
character, and stop strings that never reach the client.

Invariant: the concatenation of every delta equals `text`, which is the decode of the
tokens seen so far, cut before the first stop string once one has appeared. While stop
strings are set, the last `len(longest stop) - 1` characters are held back, since they
could be the start of a stop string.
"""
from __future__ import annotations

from typing import Sequence

from engine.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._emitted = 0  # characters of the decoded text already handed out
        self.text = ""  # handed out so far
        self.stop_string: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the new text that is safe to send."""
        if self.stopped:
            return ""
        self._detok.add(list(token_ids))
        return self._advance(self._detok.text, final=False)

    def finish(self) -> str:
        """No more tokens: return the text still held back (an incomplete trailing
        character decodes as U+FFFD, like a full decode would)."""
        if self.stopped:
            return ""
        self._detok.flush()
        return self._advance(self._detok.text, final=True)

    def _advance(self, full: str, final: bool) -> str:
        cut = self._find_stop(full)
        if cut is not None:
            end = cut
        elif final:
            end = len(full)
        else:
            end = max(self._emitted, len(full) - self._hold)
        delta = full[self._emitted:end]
        self._emitted = end
        self.text += delta
        return delta

    def _find_stop(self, full: str) -> int | None:
        """Position of the earliest stop string in the text, searching only where a new
        occurrence can be (text before `_emitted` was already checked)."""
        start = max(0, self._emitted - self._hold)
        hits = [(i, s) for s in self._stop if (i := full.find(s, start)) >= 0]
        if not hits:
            return None
        position, self.stop_string = min(hits)
        return position
