"""Degeneracy of a generated text: how far it has collapsed into repetition or into
symbols (emoji spam, a repeated word), measured on its tokens without a model.

Perplexity alone rewards collapse (a model finds its own loops and emoji runs likely), so
a cost built on it needs this next to it. The measures are plain functions of the text
each token adds (``pieces``, e.g. ``jupyter.render.token_pieces``). A token that ends
inside a character (``""``: part of an emoji's or a CJK character's bytes) is counted
with the token that completes the character, so byte-split characters neither inflate
nor hide anything.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

COLLAPSED = 0.5
"""``Degeneracy.score`` at or above which a text counts as collapsed: half its token
bigrams repeat earlier ones, or half its tokens are symbols. Coherent text scores near 0."""


@dataclass(frozen=True)
class Degeneracy:
    """Collapse measures of one text, each in 0..1.

    ``distinct_1`` / ``distinct_2``: distinct token unigrams / bigrams over all of them
    (1.0 where there are none); ``repetition``: ``1 - distinct_2``, the share of bigrams
    that repeat an earlier one; ``nonword``: the share of tokens that are neither words nor
    numbers nor punctuation/whitespace (emoji, other symbols, control characters, U+FFFD);
    ``tokens``: how many tokens were measured.
    """

    distinct_1: float
    distinct_2: float
    nonword: float
    tokens: int

    @property
    def repetition(self) -> float:
        return 1.0 - self.distinct_2

    @property
    def score(self) -> float:
        """The worse of ``repetition`` and ``nonword``: 0 coherent .. 1 fully collapsed."""
        return max(self.repetition, self.nonword)

    @property
    def collapsed(self) -> bool:
        return self.score >= COLLAPSED


def degeneracy(pieces: Sequence[str]) -> Degeneracy:
    """The degeneracy of a text given as the text each token adds, in order."""
    units = _characters_completed(pieces)
    kinds = [_kind(u) for u in units]
    nonword = sum(k == "symbol" for k in kinds) / len(units) if units else 0.0
    return Degeneracy(distinct_1=distinct_n(units, 1), distinct_2=distinct_n(units, 2),
                      nonword=nonword, tokens=len(pieces))


def distinct_n(items: Sequence, n: int) -> float:
    """Distinct ``n``-grams of ``items`` over all of them; 1.0 where there are none."""
    grams = [tuple(items[i:i + n]) for i in range(len(items) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _characters_completed(pieces: Sequence[str]) -> list[str]:
    """``pieces`` with each run of ``""`` (tokens ending inside a character) given the text
    of the token that completes the character; a run left open at the end stays as U+FFFD."""
    out, pending = [], 0
    for piece in pieces:
        if piece == "":
            pending += 1
            continue
        out += [piece] * (pending + 1)
        pending = 0
    return out + ["\ufffd"] * pending


def _kind(piece: str) -> str:
    """``"word"`` (holds a letter or digit), ``"punctuation"`` (only punctuation and
    whitespace) or ``"symbol"`` (anything else: emoji, symbols, control characters)."""
    categories = [unicodedata.category(c) for c in piece]
    if any(c[0] in "LN" for c in categories):
        return "word"
    if all(c[0] in "PZ" or ch in "\n\t\r" for c, ch in zip(categories, piece)):
        return "punctuation"
    return "symbol"
