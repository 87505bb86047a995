"""Incremental detokenization for streaming: text deltas of whole characters, cut at stop strings.

Decoding one token at a time is wrong for byte-level and SentencePiece vocabularies: a character may
span tokens (a 4-byte emoji over up to 4 byte tokens) and a token's leading space depends on what
precedes it. So each step decodes a short window, tokens[prefix_offset:], and compares it with the
decode of tokens[prefix_offset:read_offset] (text already emitted); the difference is new text. While
the window's text ends in U+FFFD the last character is still incomplete and nothing is emitted.

Stop strings may span tokens. Text is emitted only up to the point where no stop string could still
begin: the longest tail of the pending text that is a prefix of some stop string is held back. When a
stop string appears, text up to its start is emitted and nothing after it, ever.
"""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"
_PREFIX_WINDOW = 5  # prompt tokens decoded as context, so the first output token gets its spacing right


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self._token_ids = list(prompt_token_ids[-_PREFIX_WINDOW:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._pending = ""  # decoded text not yet emitted: it may be the start of a stop string
        self.stopped = False  # a stop string was found; everything after it is dropped
        self.text = ""  # all text emitted so far

    def add_token(self, token_id: int) -> str:
        """The text delta this token completes (possibly empty). Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        self._token_ids.append(token_id)
        self._pending += self._decode_new()
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of the sequence: the held-back text (an incomplete last character decodes as
        U+FFFD, so the deltas always add up to the decode of the whole output)."""
        if self.stopped:
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        tail = self._decode(self._token_ids[self._prefix_offset :])[len(prefix_text) :]
        self._read_offset = len(self._token_ids)
        self._pending += tail
        return self._emit(final=True)

    def _decode_new(self) -> str:
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing whole yet: wait for the bytes that finish the character
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        return new_text[len(prefix_text) :]

    def _emit(self, final: bool) -> str:
        text = self._pending
        cut = _first_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            text, self._pending = text[:cut], ""
        elif final:
            self._pending = ""
        else:
            held = _held_back(text, self.stop)
            text, self._pending = text[: len(text) - held], text[len(text) - held :]
        self.text += text
        return text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string in text begins, or None."""
    starts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(starts) if starts else None


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of text that a stop string starts with."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
