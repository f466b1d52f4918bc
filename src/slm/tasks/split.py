"""Cut a document into pieces that each fit a token budget, along its own structure: Markdown sections
first, then paragraphs, then sentences, then words (and, for a "word" longer than the budget, characters).

Every piece keeps the whitespace that follows it, so the pieces put back together are the text, byte for
byte. Neighbouring small pieces are packed together up to the budget: a model reads a few large chunks
better than many scraps.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Count = Callable[[str], int]
"""Tokens of a text, as the model counts them."""

# Each pattern's end is a place where the text may be cut at that level.
LEVELS = (
    re.compile(r"(?m)^(?=#{1,6}[ \t])"),  # before a Markdown heading
    re.compile(r"\n[ \t]*\n\s*"),  # after a blank line
    re.compile(r"[.!?。！？][\"')\]]*\s+"),  # after a sentence
    re.compile(r"\s+"),  # after a word
)
PARAGRAPH = LEVELS[1]


def split(text: str, count: Count, budget: int) -> list[str]:
    """``text`` in pieces of at most ``budget`` tokens each (by ``count``), cut at the coarsest structure
    that makes them fit; ``"".join(pieces) == text``."""
    if budget < 1:
        raise ValueError(f"budget must be at least 1 token, got {budget}")
    return _chunks(text, count, budget, 0)


def paragraphs(text: str) -> list[str]:
    """The blocks of ``text`` between blank lines, each with the blank lines after it."""
    return cut(text, PARAGRAPH)


def cut(text: str, at: re.Pattern[str]) -> list[str]:
    """``text`` cut at the end of every match of ``at`` (whitespace stays with the piece before it)."""
    pieces, start = [], 0
    for match in at.finditer(text):
        end = match.end()
        if 0 < end < len(text) and end > start:
            pieces.append(text[start:end])
            start = end
    pieces.append(text[start:])
    return [p for p in pieces if p]


def _chunks(text: str, count: Count, budget: int, level: int) -> list[str]:
    """``text`` within ``budget``: cut at ``level``, the pieces that fit packed together, the pieces that
    do not cut at the next level on their own (so a chunk never mixes the ends of two larger pieces)."""
    if count(text) <= budget:
        return [text]
    if level == len(LEVELS):
        return _characters(text, count, budget)
    pieces = cut(text, LEVELS[level])
    if len(pieces) == 1:
        return _chunks(text, count, budget, level + 1)
    chunks: list[str] = []
    run: list[tuple[str, int]] = []
    for piece in pieces:
        tokens = count(piece)
        if tokens <= budget:
            run.append((piece, tokens))
        else:
            chunks += _pack(run, count, budget)
            run = []
            chunks += _chunks(piece, count, budget, level + 1)
    return chunks + _pack(run, count, budget)


def _characters(text: str, count: Count, budget: int) -> list[str]:
    """A single "word" over the budget (a URL, a blob): halves until each part fits."""
    if len(text) == 1 or count(text) <= budget:
        return [text]
    middle = len(text) // 2
    return [*_characters(text[:middle], count, budget), *_characters(text[middle:], count, budget)]


def _pack(units: list[tuple[str, int]], count: Count, budget: int) -> list[str]:
    """Consecutive units joined while the joined text stays within ``budget``. The joined text is counted
    again each time: tokens of a concatenation are not the sum of its pieces' (BPE merges across them)."""
    chunks: list[str] = []
    current = ""
    for text, _ in units:
        if current and count(current + text) > budget:
            chunks.append(current)
            current = ""
        current += text
    if current:
        chunks.append(current)
    return chunks
