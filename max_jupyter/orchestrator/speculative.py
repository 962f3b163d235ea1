"""Greedy speculative decoding: the mirrored small model drafts, the big model verifies.

At a step ``t >= 1`` (the big cache holds the context up to token ``t - 2``, the small one up
to token ``t - 1``) the small model proposes ``k`` tokens greedily through the mirror; the big
model feeds token ``t - 1`` and the draft in one ``Engine.verify`` with the step's deltas and
takes its own greedy token at every position. The longest prefix of the draft that matches
is accepted, and the big model's token after it is added (a correction, or a bonus when all
matched): ``accepted + 1`` tokens, each then handed out as one ordinary step. Both caches
rewind the rejected tail, so they hold what a non-speculative run would hold; the tokens
are the non-speculative greedy tokens (up to ties between logits that differ only by the
rounding of a multi-token pass, about 1e-5 in fp32).

``DraftLength`` adapts ``k`` to the measured agreement.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from max_jupyter.engines.base import Engine, ForwardResult, LayerDeltas
from max_jupyter.orchestrator.mirror import ContextMirror

MAX_SPECULATE = 16
"""The largest draft length a generation may ask for (``speculate``)."""

SmallState = tuple[dict[int, torch.Tensor], torch.Tensor]
"""The small model's captured rows and next-token logits after one token (the mirror's
``hidden`` and ``logits``)."""


@dataclass
class DraftLength:
    """The adaptive draft length ``k`` in ``0..limit`` (starts at ``limit``). A fully
    accepted draft grows it by one, a rejection shrinks it by one; at 0 nothing is drafted
    until a plain step where the small model's greedy guess equals the big model's token
    (then 1), so a drafter that disagrees costs a few drafts, then only an argmax a step."""

    limit: int
    k: int = field(init=False)

    def __post_init__(self):
        self.k = self.limit

    def after_draft(self, drafted: int, accepted: int) -> None:
        self.k = min(self.limit, self.k + 1) if accepted == drafted else max(0, self.k - 1)

    def after_plain(self, guess: int, token: int) -> None:
        if self.k == 0 and guess == token:
            self.k = 1


@dataclass
class Block:
    """One verified draft, handed out one step at a time.

    ``drafted``: the small model's proposal; ``tokens``: its accepted prefix and the big
    model's token after it (``accepted + 1`` tokens); ``out``: the verify pass (row ``j``
    of ``all_logits`` and of each ``hidden`` belongs to ``tokens[j]``); ``states``: the
    small model's state before each of ``tokens``; ``deltas`` / ``coefs``: the steering
    the verify ran with (one snapshot of the mixes for the whole block); ``next``: how
    many tokens were handed out. Until the last one is, both caches hold the accepted
    draft: the big one ``accepted - j`` positions, the small one ``accepted - j - 1``
    positions past the state of a non-speculative run after step ``j`` of the block.
    """

    drafted: tuple[int, ...]
    tokens: list[int]
    out: ForwardResult
    states: list[SmallState]
    deltas: LayerDeltas | None
    coefs: dict[str, float]
    next: int = 0

    @property
    def accepted(self) -> int:
        return len(self.tokens) - 1

    def take(self) -> tuple[int, int, ForwardResult, SmallState]:
        """The next token: its index in the block, the token, its row of the verify pass
        (``logits`` ``[vocab]``, ``hidden`` rows ``[1, hidden]``) and the small state before it."""
        j = self.next
        self.next += 1
        row = ForwardResult(self.out.all_logits[j], {l: h[j:j + 1] for l, h in self.out.hidden.items()})
        return j, self.tokens[j], row, self.states[j]

    @property
    def done(self) -> bool:
        return self.next > self.accepted

    def settle(self, big: Engine, mirror: ContextMirror, eos: bool) -> None:
        """The generation ended inside the block (EOS or a stop string at a drafted token,
        an abort, an interrupt): rewind both caches to the non-speculative state after the
        last handed-out token (with ``eos`` that token never reached the small model)."""
        j = max(self.next - 1, 0)
        if j >= self.accepted:
            return
        big.rewind(self.accepted - j)
        extra = self.accepted - j - (0 if eos else 1)
        mirror.rewind(extra, *self.states[self.accepted - extra])


def draft_and_verify(big: Engine, mirror: ContextMirror, last: int, k: int,
                     deltas: LayerDeltas | None, coefs: dict[str, float],
                     capture: tuple[int, ...]) -> Block:
    """Draft ``k`` tokens with the small model, verify them with the big model after
    ``last`` (the token it has not fed yet) with ``deltas``; rewind both caches to the
    accepted prefix (see ``Block``). A failure or interrupt leaves both caches as before."""
    start, fed = (mirror.hidden, mirror.logits), len(mirror.ids)
    try:
        drafted, states = _draft(mirror, k)
        out = big.verify([last, *drafted], deltas, capture)
    except BaseException:
        mirror.rewind(len(mirror.ids) - fed, *start)
        raise
    choices = out.all_logits.argmax(-1).tolist()  # greedy, as Sampler.sample
    a = 0
    while a < k and drafted[a] == choices[a]:
        a += 1
    big.rewind(k - a)
    if a == k:
        mirror.feed(drafted[-1])
        states.append((mirror.hidden, mirror.logits))
    else:
        mirror.rewind(k - 1 - a, *states[a])
        del states[a + 1:]
    return Block(tuple(drafted), [*drafted[:a], choices[a]], out, states, deltas, coefs)


def _draft(mirror: ContextMirror, k: int) -> tuple[list[int], list[SmallState]]:
    """``k`` greedy tokens from the mirror's small model, feeding all but the last; the
    small states before each of them."""
    drafted: list[int] = []
    states: list[SmallState] = [(mirror.hidden, mirror.logits)]
    for i in range(k):
        drafted.append(int(mirror.logits.argmax()))
        if i < k - 1:
            mirror.feed(drafted[-1])
            states.append((mirror.hidden, mirror.logits))
    return drafted, states
