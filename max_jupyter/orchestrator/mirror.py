"""``ContextMirror``: keeps the small model's cache in step with the big model's context.

Same vocabulary: the big model's token ids pass straight across (one small step per token).

Different tokenizers: the mirror works on text. The big model's tokens are decoded with a
``StreamDecoder`` (a token ending inside a UTF-8 character adds nothing until the character
is complete) and the generated text is re-tokenised for the small model. A piece ending
mid-word can change the small model's last tokens ("hel" + "lo" -> "hello"): the mirror
compares the new tokens with those in the small cache, rewinds to the longest common prefix
and feeds the rest. Re-tokenising is windowed: it restarts at a word boundary a few small
tokens back where the small tokenizer is known to split the same way (checked once on a
sample), so a step costs O(window), not O(text). ``finish`` re-tokenises the whole text once.

Invariant (also after an interrupt): the small cache holds exactly ``ids``. After
``finish``: ``ids == small prompt ids + small.encode(generated text)`` — the same as a
fresh prefill of that text.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from max_jupyter.engines.base import Engine, ForwardResult
from max_jupyter.errors import BadArgumentError, MaxJupyterError
from max_jupyter.orchestrator.types import Prompt, prompt_ids
from max_jupyter.tokenizer import Tokenizer

WINDOW_SAMPLE = ("Hello world, it's 12 o'clock; naïve café résumé 日本語 text. "
                 "Then: x=3*(y+2)  done!\nNew line\t tabbed  ok — «quoted» 🙂 end")


class MirrorError(MaxJupyterError, ValueError):
    """The small model cannot follow the big one (vocabularies differ, no tokenizer)."""


def shares_vocabulary(big: Engine, small: Engine) -> bool:
    """Whether token ids mean the same in both models.

    With both tokenizers: their vocabularies (token -> id) are compared. Without one, equal
    vocabulary sizes are taken as the same vocabulary; different sizes raise ``MirrorError``.
    """
    a, b = getattr(big, "tokenizer", None), getattr(small, "tokenizer", None)
    if a is not None and b is not None:
        return a is b or big.identity == small.identity or a.hf.get_vocab() == b.hf.get_vocab()
    if big.identity.vocab_size == small.identity.vocab_size:
        return True
    missing = "big" if a is None else "small"
    raise MirrorError(f"the big ({big.identity.describe()}) and small ({small.identity.describe()}) "
                      f"models have different vocabularies and the {missing} engine has no "
                      f"tokenizer, so the mirror can pass neither token ids nor text across.")


def split_is_stable(text: str, at: int) -> bool:
    """Whether ``text`` may be cut at ``at`` for tokenising: a single space between two
    non-space characters (where regex and metaspace pre-tokenisers start a new word)."""
    return (0 < at < len(text) - 1 and text[at] == " " and not text[at - 1].isspace()
            and not text[at + 1].isspace())


def window_safe(tokenizer: Tokenizer) -> bool:
    """Whether tokenising the pieces of ``WINDOW_SAMPLE`` cut at every stable split point
    gives the tokens of the whole (true for byte-level BPE and metaspace tokenizers)."""
    whole = tokenizer.encode(WINDOW_SAMPLE)
    return all(tokenizer.encode(WINDOW_SAMPLE[:i]) + tokenizer.encode(WINDOW_SAMPLE[i:]) == whole
               for i in range(len(WINDOW_SAMPLE)) if split_is_stable(WINDOW_SAMPLE, i))


class ContextMirror:
    """Feeds ``small`` the context that ``big`` sees; the small model is never steered.

    After ``start`` and every ``feed`` that ran the small model, ``hidden`` (layer ->
    ``[hidden_small]``, at the last fed position) and ``logits`` (``[vocab_small]``) hold its
    state; ``capture`` (given to ``start``) chooses the layers.
    """

    def __init__(self, big: Engine, small: Engine, window: int = 8):
        if small is big:
            raise BadArgumentError("the small model must be a separate engine (each engine owns one "
                                   "KV cache); load the model a second time to mirror it.")
        self.big, self.small = big, small
        self.shares_vocab = shares_vocabulary(big, small)
        self.window = window if not self.shares_vocab and window_safe(small.tokenizer) else 0
        self.ids: list[int] = []  # the small cache's contents
        self.hidden: dict[int, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None
        self.text = ""  # text mode: the generated text the small model has seen
        self._capture: Collection[int] = ()
        self._prompt_len = 0
        self._decoder = None
        self._marks: list[tuple[int, int]] = []  # (len(text), generated small ids) known to agree

    def start(self, prompt: Prompt, big_ids: Sequence[int], chat: bool = True,
              capture: Collection[int] = ()) -> None:
        """Prefill the small model with the prompt (``big_ids`` as the big model saw it)."""
        self._capture = tuple(capture)
        if self.shares_vocab:
            ids = list(big_ids)
        elif isinstance(prompt, str) or not all(isinstance(t, int) for t in prompt):
            ids = prompt_ids(self.small, prompt, chat)  # the small model's own chat template
        else:
            ids = self.small.tokenizer.encode(self.big.tokenizer.decode(big_ids))
        self.ids = []
        self._take(self.small.prefill(ids, capture=self._capture))
        self.ids = ids
        self._prompt_len = len(ids)
        self.text, self._marks = "", [(0, 0)]
        self._decoder = None if self.shares_vocab else self.big.tokenizer.stream_decoder()

    def feed(self, token_id: int) -> bool:
        """Follow one token emitted by the big model; return whether the small model ran."""
        if self.shares_vocab:
            self._take(self.small.step(token_id, capture=self._capture))
            self.ids.append(token_id)
            return True
        piece = self._decoder.feed(token_id)
        if not piece:
            return False
        self.text += piece
        chars, n = self._anchor()
        window = self.small.tokenizer.encode(self.text[chars:])
        keep = self._sync(self._prompt_len + n, window)
        marks = self._marks
        while len(marks) > 1 and marks[-1][1] > keep - self._prompt_len:
            marks.pop()
        marks.append((len(self.text), len(self.ids) - self._prompt_len))
        return True

    def rewind(self, n: int, hidden: dict[int, torch.Tensor], logits: torch.Tensor) -> None:
        """Same vocabulary: drop the last ``n`` tokens fed (small cache and ``ids``) and
        restore ``hidden`` / ``logits``, the state the caller kept from after the token now
        last (speculative drafts are fed with ``feed`` and taken back with this)."""
        if n:
            self.small.rewind(n)
            del self.ids[len(self.ids) - n:]
        self.hidden, self.logits = hidden, logits

    def finish(self) -> None:
        """Text mode: take any held-back text and re-tokenise the whole of it once."""
        if self.shares_vocab or self._decoder is None:  # None: start() never finished
            return
        self.text += self._decoder.flush()
        p = self._prompt_len
        self._sync(p, self.small.tokenizer.encode(self.text))
        self._marks = [(0, 0)]

    def _anchor(self) -> tuple[int, int]:
        """The latest mark at least ``window`` small tokens back at a stable split point."""
        if not self.window:
            return 0, 0
        limit = len(self.ids) - self._prompt_len - self.window
        marks = self._marks
        for i in range(len(marks) - 1, 0, -1):
            chars, n = marks[i]
            if n <= limit and split_is_stable(self.text, chars):
                del marks[1:i]  # earlier marks are never needed again
                return chars, n
        return marks[0]

    def _sync(self, known: int, tail: list[int]) -> int:
        """Make the small cache hold ``ids[:known] + tail`` (its first ``known`` ids stay);
        return how many ids were kept. Costs O(len(tail)), not O(context)."""
        ids = self.ids
        j, end = 0, min(len(ids) - known, len(tail))
        while j < end and ids[known + j] == tail[j]:
            j += 1
        if j == len(tail) == len(ids) - known:
            return len(ids)
        keep = min(known + j, known + len(tail) - 1)  # re-feed >= 1 token: fresh logits, hidden
        feed = ids[keep:known] + tail[max(0, keep - known):]
        self.small.rewind(len(ids) - keep)
        del ids[keep:]
        self._take(self.small.forward(feed, capture=self._capture))
        ids.extend(feed)
        return keep

    def _take(self, out: ForwardResult) -> None:
        self.logits = out.logits
        self.hidden = {layer: h[-1] for layer, h in out.hidden.items()}  # [hidden_small]
