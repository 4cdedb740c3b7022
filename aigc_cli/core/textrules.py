"""Text-level rules checked while decoding: stop strings and banned words; no torch."""

from __future__ import annotations

import re
from collections.abc import Sequence


_ESCAPE = re.compile(r"\\(?:([\\ntr])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4}))")
_SIMPLE = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


def unescape(text: str) -> str:
    """Backslash escapes as a user types them in a shell: \\n \\t \\r \\\\ \\xHH \\uHHHH; any other
    backslash is kept as it is."""

    def one(m: re.Match[str]) -> str:
        simple, byte, code = m.groups()
        return _SIMPLE[simple] if simple else chr(int(byte or code, 16))

    return _ESCAPE.sub(one, text)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def stream_safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be shown now without showing part of a stop string or a split UTF-8
    char: the text less its longest end that is the start of a stop string (each stop in turn).

    Only the candidate starts (where the stop string's first character occurs, found by
    `str.find` at C speed) are compared, where trying every length from the longest down took a
    step, a slice and a comparison per character of each stop string, for each event of a stream."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":  # an incomplete multi-byte character decodes as U+FFFD
        n -= 1
    for s in stops:
        n -= _partial_stop(text, n, s)
    return max(n, 0)


def _partial_stop(text: str, n: int, stop: str) -> int:
    """Length of the longest end of text[:n] that is the start of `stop` (shorter than `stop`)."""
    if len(stop) < 2 or n == 0:
        return 0
    first = stop[0]
    j = text.find(first, max(0, n - len(stop) + 1), n)
    while j != -1:
        if stop.startswith(text[j:n]):
            return n - j
        j = text.find(first, j + 1, n)
    return 0


class BanRule:
    """Whole-word, case-insensitive banned words; the end of the text counts as a word boundary.

    Treating the end as a boundary is conservative: with `--ban cat` the text may never end in
    "cat" at any step, so "category" can only appear when no step ends right after "cat".
    """

    def __init__(self, words: Sequence[str]) -> None:
        cleaned = [w.strip() for w in words if w.strip()]
        self.words = tuple(cleaned)
        self._pattern = (
            re.compile("|".join(rf"(?<!\w){re.escape(w)}(?!\w)" for w in cleaned), re.IGNORECASE)
            if cleaned
            else None
        )
        self._span = max((len(w) for w in cleaned), default=0) + 1

    def __bool__(self) -> bool:
        return self._pattern is not None

    def violated(self, before: str, after: str) -> bool:
        """True when `after` (which extends `before`) holds a banned word ending in the new part."""
        if self._pattern is None:
            return False
        start = max(0, len(before) - self._span)
        return any(m.end() > len(before) for m in self._pattern.finditer(after, start))

    def variants(self) -> list[str]:
        """Common spellings of each word, used to ban their exact token sequences up front."""
        out: list[str] = []
        for w in self.words:
            for v in {w, w.lower(), w.capitalize(), w.upper()}:
                out += [v, " " + v]
        return out


# Where byte-level BPE's pre-tokenizer (GPT-2's) and WordPiece's split text anyway, so that pieces
# cut there encode to the ids of the whole: after a newline between two non-spaces, before a space
# between two non-spaces. Not after a run of newlines: "a\n\n" ends in one token, "a\n\nb" in two.
TOKEN_CUTS = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")
