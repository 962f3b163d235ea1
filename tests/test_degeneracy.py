"""Degeneracy measures on token texts: collapse (emoji spam, a repeated word, a looping
sentence) scores high, coherent text, lists and byte-split characters (CJK) low."""
from __future__ import annotations

import pytest

from max_jupyter.evaluation import COLLAPSED, degeneracy, distinct_n
from max_jupyter.jupyter.render import token_pieces


def pieces(engine, text: str) -> list[str]:
    return token_pieces(engine.tokenizer, engine.tokenizer.encode(text, add_special_tokens=False))


def test_distinct_n():
    assert distinct_n([1, 2, 3, 1, 2, 3], 1) == 0.5
    assert distinct_n([1, 2, 3, 1, 2, 3], 2) == pytest.approx(3 / 5)
    assert distinct_n([7], 2) == 1.0 and distinct_n([], 1) == 1.0


@pytest.mark.parametrize("text", [
    "The sea is vast and deep. Waves roll in from the horizon, grey under a low sky, and gulls "
    "call over the harbour while fishing boats head out before dawn.",
    "1. Bananas\n2. Oranges\n3. Grapes\n4. Apples, pears & plums (ripe!).",
    "你好世界，今天天气很好。我们去公园散步吧。",
])
def test_coherent_text_is_not_collapsed(engine, text):
    d = degeneracy(pieces(engine, text))
    assert d.score < 0.2 and not d.collapsed, d


@pytest.mark.parametrize("text, measure", [
    ("\U0001f60a\U0001f30a\U0001f389\U0001f973" * 10, "nonword"),
    (" happy" * 30, "repetition"),
    ("The cat sat on the mat. " * 5, "repetition"),
    ("!!! " * 20, "repetition"),
])
def test_collapse_scores_high(engine, text, measure):
    d = degeneracy(pieces(engine, text))
    assert getattr(d, measure) >= 0.6 and d.collapsed and d.score >= COLLAPSED, d


def test_a_byte_split_character_counts_with_the_token_that_completes_it():
    emoji, cjk = degeneracy(["", "\U0001f973", " ok"]), degeneracy(["", "\u6d77", " ok"])
    assert emoji.nonword == pytest.approx(2 / 3) and cjk.nonword == 0.0
    assert degeneracy(["ok", ""]).nonword == 0.5  # an unfinished character at the end
    assert degeneracy([]).score == 0.0
