"""Speculative decoding: the mirrored small model drafts, the big model verifies.

At a step ``t >= 1`` (the big cache holds the context up to token ``t - 2``, the small one
up to token ``t - 1``) the small model proposes ``k`` tokens through the mirror, each drawn
from ``q_i``, the sampler's distribution (temperature, top-k, top-p) of its logits; the big
model feeds token ``t - 1`` and the draft in one ``Engine.verify``, each row with its own
step's deltas (``RowSteering``), giving ``p_i``, the sampler's distribution of each row. The
rule of speculative sampling (Leviathan et al. 2023, Chen et al. 2023) keeps draft ``x_i``
with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection it draws from
``norm(max(0, p_i - q_i))`` instead, and when all ``k`` are kept it draws a bonus token from
``p_k``: ``accepted + 1`` tokens, each distributed exactly as ordinary sampling from ``p``
would give it, each then handed out as one ordinary step. Greedy decoding is the case where
``p`` and ``q`` are one-hot: the longest matching prefix, then the big model's own token —
the non-speculative greedy tokens (up to ties between logits that differ only by the
rounding of a multi-token pass, about 1e-5 in fp32). Both caches rewind the rejected tail,
so they hold what a non-speculative run would.

``DraftLength`` adapts ``k`` to the measured acceptance.
"""
from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from max_jupyter.engines.base import Engine, ForwardResult, LayerDeltas
from max_jupyter.orchestrator.mirror import ContextMirror
from max_jupyter.orchestrator.sampling import Sampler, residual

MAX_SPECULATE = 16
"""The largest draft length a generation may ask for (``speculate``)."""

SmallState = tuple[dict[int, torch.Tensor], torch.Tensor]
"""The small model's captured rows and next-token logits after one token (the mirror's
``hidden`` and ``logits``)."""


PACE_BASELINE = 3
"""Plain steps timed at the start of a paced generation before the first draft."""
PACE_BLOCKS = 3
"""Blocks timed before their pace is held against the plain one."""
PACE_MARGIN = 0.03
"""How much slower per token speculation may run than plain steps before it drafts one
shorter (``Pace.cap``) or, at one draft, pauses."""
PACE_GROW = 0.10
"""How much faster per token speculation must run than plain steps, its drafts at the
longest the pace allows (``Pace.cap``), before a draft one longer is tried."""
PACE_PAUSE = 64
"""Plain steps a paused speculation waits before it drafts again (then timed afresh); each
pause right after a retry that did not pay either is twice as long, up to ``PACE_PAUSE_MAX``."""
PACE_PAUSE_MAX = 1024
PACE_WINDOW = 8
"""Recent units (plain steps, blocks) whose cost per token is the pace (``per_token``)."""
PACE_OUTLIER = 4.0
"""A unit taking over this many times the median unit's wall time is left out of the pace:
the odd slow one (a CUDA graph captured at a new cache bucket) says nothing of the rest."""
PACE_GUESSES = 32
"""Recent plain steps whose agreement (the small model's greedy guess is the big model's
token) estimates the acceptance a retry would see; half as many are needed to use it."""
PACE_FRESH = 8
"""The recent guesses, made during a pause, that can end it early (``Pace.conditions_changed``)."""
PACE_SHIFT = 0.2
"""How much more often those guesses must agree than the ones before the pause did."""


def per_token(units: Sequence[tuple[float, int]]) -> float:
    """Wall seconds per token over ``units`` (seconds, tokens): the ratio of their sums,
    leaving out units over ``PACE_OUTLIER`` times the median unit's seconds. A ratio of sums,
    not a median of each unit's seconds per token: blocks yield different numbers of tokens,
    and where one-draft blocks yield 1 or 2 tokens the median unit reads the 1-token kind
    as typical and calls speculation that pays 20% a loss."""
    limit = PACE_OUTLIER * statistics.median(s for s, _ in units)
    kept = [(s, n) for s, n in units if s <= limit]
    return sum(s for s, _ in kept) / sum(n for _, n in kept)


@dataclass
class Pace:
    """Wall seconds of recent plain steps and speculative blocks, and what they decided:
    ``cap`` the longest draft, ``paused`` plain steps to go before speculation is timed
    again, ``pause`` the next pause's length. It outlives a generation where the caller keeps
    it (a Session keeps one for its pair of models): what one generation measured holds for
    the next, so only the first times its plain steps before drafting, and a machine where
    speculation does not pay stops paying for it after the first generation. A pause ends
    early where the small model's guesses during it show that the text changed
    (``conditions_changed``)."""

    plain: deque[float] = field(default_factory=lambda: deque(maxlen=PACE_WINDOW))
    """Recent plain steps' wall seconds (one token each)."""
    spec: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=PACE_WINDOW))
    """Recent blocks since the cap last changed or speculation last paused: (wall seconds,
    tokens handed out)."""
    paused: int = 0
    pause: int = PACE_PAUSE
    blocks: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=PACE_WINDOW))
    """Recent timed blocks: (wall seconds, tokens drafted); kept across pauses."""
    cap: int = MAX_SPECULATE
    """The longest draft the pace allows now (``DraftLength.k`` is at most this)."""
    guesses: deque[bool] = field(default_factory=lambda: deque(maxlen=PACE_GUESSES))
    """Recent plain steps: did the small model's greedy guess equal the big model's token."""
    fresh: int = 0
    """Guesses made since the pause began."""
    paused_agree: float | None = None
    """The share of right guesses when the pause began (None: none were made)."""

    def add(self, block: bool, seconds: float, tokens: int, drafted: int = 0) -> None:
        if block:
            self.spec.append((seconds, max(tokens, 1)))
            self.blocks.append((seconds, drafted))
        else:
            self.plain.append(seconds / max(tokens, 1))

    def guess(self, right: bool) -> None:
        """Note a plain step's guess (``right``: the small model's greedy guess was the
        big model's token)."""
        self.guesses.append(right)
        self.fresh += bool(self.paused)

    def start_pause(self, steps: int) -> None:
        """Pause speculation for ``steps`` plain steps; note the guesses' agreement so far."""
        self.paused, self.fresh = steps, 0
        self.paused_agree = sum(self.guesses) / len(self.guesses) if self.guesses else None

    def _block_yield(self, agree: float) -> tuple[float, float]:
        """(tokens, units) of a block of the recent draft length at guess rate ``agree``:
        about ``1 + a + ... + a^k`` tokens (each draft kept as often as a guess was right),
        and what it costs in plain steps, each one token (medians of timed blocks and plain
        steps)."""
        k = round(statistics.median(k for _, k in self.blocks))
        units = statistics.median(s for s, _ in self.blocks) / statistics.median(self.plain)
        return sum(agree ** i for i in range(k + 1)), units

    def retry_would_lose(self) -> bool:
        """What the plain steps saw says a retry would not pay, so it need not be timed:
        a block yields fewer tokens than it costs plain steps (``_block_yield``) at the
        recent guesses' rate. False without the evidence (fewer than half of
        ``PACE_GUESSES`` guesses, no block or plain step timed)."""
        if len(self.guesses) < PACE_GUESSES // 2 or not self.blocks or not self.plain:
            return False
        tokens, units = self._block_yield(sum(self.guesses) / len(self.guesses))
        return tokens < units

    def conditions_changed(self) -> bool:
        """During a pause: the last ``PACE_FRESH`` guesses, all made since it began, agree
        at least ``PACE_SHIFT`` more often than those before it did (a new prompt, steering
        turned off), and at their rate a block pays by over ``PACE_GROW``. Only the last
        few count: a pause carried over from a generation that did not pay has that
        generation's guesses in it. Where the guesses misled before the pause (right, yet
        drafts rejected) they cannot end it; where none were made before it, only the pay
        counts."""
        if self.fresh < PACE_FRESH or not self.blocks or not self.plain:
            return False
        recent = list(self.guesses)[-PACE_FRESH:]
        agree = sum(recent) / len(recent)
        if self.paused_agree is not None and agree < self.paused_agree + PACE_SHIFT:
            return False
        tokens, units = self._block_yield(agree)
        return tokens > units * (1 + PACE_GROW)

    def recent_drafts(self) -> int:
        """The median draft length of the last ``PACE_BLOCKS`` timed blocks."""
        return round(statistics.median(k for _, k in list(self.blocks)[-PACE_BLOCKS:]))

    def cost_ratio(self) -> float | None:
        """Wall time per token of recent blocks over that of recent plain steps
        (``per_token``; None until ``PACE_BLOCKS`` blocks and a plain step are timed)."""
        if len(self.spec) < PACE_BLOCKS or not self.plain:
            return None
        return per_token(self.spec) / per_token([(s, 1) for s in self.plain])

    def speculation_slower(self) -> bool:
        """``PACE_BLOCKS`` blocks timed, and their cost per token exceeds the plain
        steps' by over ``PACE_MARGIN``."""
        ratio = self.cost_ratio()
        return ratio is not None and ratio > 1 + PACE_MARGIN


@dataclass
class DraftLength:
    """The adaptive draft length ``k`` in ``0..limit`` (starts at ``limit``).

    By acceptance: a fully accepted draft grows it by one, a rejection shrinks it by one;
    at 0 nothing is drafted until a plain step where the small model's greedy guess equals
    the big model's token (then 1), so a drafter that disagrees costs a few drafts, then
    only an argmax a step. By speed (``paced``): the orchestrator reports each plain step
    and each block with ``clock`` / ``begin`` into ``pace``; until ``PACE_BASELINE`` plain
    steps are timed, steps run plain; where ``PACE_BLOCKS`` blocks then cost more wall time
    per token than plain steps (``Pace``), drafts are capped one shorter than theirs
    (``Pace.cap``) and timed afresh, and where one-draft blocks do not pay either,
    speculation pauses for ``PACE_PAUSE`` plain steps (twice as long after each retry that
    did not pay) and is timed afresh after them with one draft, unless the plain steps'
    guesses say a retry would lose (``Pace.retry_would_lose``): then it waits another pause,
    untimed. A pause ends early where the guesses made during it agree far more often than
    those before it and say a block would pay (``Pace.conditions_changed``: a new prompt,
    or steering turned off under a drafter that is never steered). Blocks that run into
    the cap and pay by over ``PACE_GROW`` raise it by one.
    ``warm_up``: the first block of each length is not timed (it may capture a CUDA graph:
    engines with ``use_graphs``). A ``pace`` kept from earlier generations starts this one
    where they left off (timed, or paused). So pacing costs a few blocks now and then where
    speculation does not pay on this machine.
    """

    limit: int
    paced: bool = True
    pace: Pace = field(default_factory=Pace)
    warm_up: bool = True
    _k: int = field(init=False)
    _unit: tuple[float, int, int] | None = field(default=None, init=False)
    _warm: set[int] = field(default_factory=set, init=False)  # draft lengths timed once

    def __post_init__(self):
        self._k = self.limit

    @property
    def k(self) -> int:
        """The longest draft to try now (0: a plain step)."""
        if not self.paced:
            return self._k
        if self.pace.paused or len(self.pace.plain) < PACE_BASELINE:
            return 0
        return min(self._k, self.pace.cap)

    def after_draft(self, drafted: int, accepted: int) -> None:
        self._k = min(self.limit, self._k + 1) if accepted == drafted else max(0, self._k - 1)

    def after_plain(self, guess: int, token: int) -> None:
        if self.paced:
            self.pace.guess(guess == token)
        if self._k == 0 and guess == token:
            self._k = 1

    def clock(self, now: float, step: int) -> None:
        """The unit (plain step or block) begun at the last ``begin`` ended at ``step``
        (wall clock ``now``): add it to the pace; pause or resume speculation by it."""
        if not self.paced or self._unit is None:
            return
        start, first, k = self._unit
        self._unit, block, pace = None, k > 0, self.pace
        if block and self.warm_up and k not in self._warm:  # its first verify may capture a CUDA graph
            self._warm.add(k)
            return
        pace.add(block, now - start, step - first, k)
        if block and len(pace.spec) >= PACE_BLOCKS:
            drafted = pace.recent_drafts()
            if pace.speculation_slower():
                pace.spec.clear()  # what follows is timed afresh
                if drafted > 1:  # a shorter draft wastes fewer small steps: try it before pausing
                    pace.cap = drafted - 1
                else:  # retries start at one draft
                    pace.start_pause(pace.pause)
                    pace.pause, pace.cap = min(2 * pace.pause, PACE_PAUSE_MAX), 1
            else:
                pace.pause = PACE_PAUSE
                if pace.cap <= drafted < self.limit and pace.cost_ratio() < 1 - PACE_GROW:
                    pace.cap = drafted + 1  # drafts run into the cap and pay well: try one longer
                    pace.spec.clear()
        elif not block and pace.paused:
            pace.paused = max(0, pace.paused - (step - first))
            if pace.paused and not pace.conditions_changed():
                return
            if not pace.paused and pace.retry_would_lose():
                pace.start_pause(pace.pause)  # free to judge again after it: not doubled
            else:
                pace.paused = 0
                self._k = max(self._k, 1)

    def begin(self, now: float, step: int, k: int) -> None:
        """A plain step (``k == 0``) or a block drafting ``k`` tokens starts at ``step`` (not
        timed at step 0, the prompt's prefill, nor the first block of each length)."""
        self._unit = (now, step, k) if self.paced and step > 0 else None


@dataclass
class RowSteering:
    """How one row of a verify (one step of a block) is steered, decided before the verify:
    ``deltas``, the mixes judges turned on (``mixes_on``) and the live mix's coefficients
    (``coefs``) behind them. ``judged``: the step's pre-step judging where it was done ahead,
    on the drafted tokens (the orchestrator's record of it), else None: the step is judged
    when handed out, and the block ends there if the judges decide otherwise.
    ``checkpoint``: the pre-step judges' states before that judging (``Judge.checkpoint``),
    put back where the row's step is not handed out."""

    deltas: LayerDeltas | None
    mixes_on: frozenset[str]
    coefs: dict[str, float]
    judged: object = None
    checkpoint: tuple | None = None


@dataclass
class Block:
    """One verified draft, handed out one step at a time.

    ``drafted``: the small model's proposal; ``tokens``: its accepted prefix and the token
    drawn after it (``accepted + 1`` tokens); ``sampler_probs``: the big model's probability
    of each of ``tokens`` under the sampler (1.0 when greedy); ``out``: the verify pass (row
    ``j`` of ``all_logits`` and of each ``hidden`` belongs to ``tokens[j]``); ``states``: the
    small model's state before each of ``tokens``; ``rows``: the steering each row of the
    verify ran with (``RowSteering``, one per drafted token and one more; the mixes are
    snapshotted when the block begins); ``next``: how many tokens were handed out. Until
    the last one is, both caches hold the first ``accepted`` tokens of the block.
    """

    drafted: tuple[int, ...]
    tokens: list[int]
    sampler_probs: list[float]
    out: ForwardResult
    states: list[SmallState]
    rows: list[RowSteering]
    next: int = 0

    @property
    def accepted(self) -> int:
        return len(self.tokens) - 1

    @property
    def state(self) -> SmallState:
        """The small model's state before the next token (what its pre-step judges read)."""
        return self.states[self.next]

    @property
    def row(self) -> RowSteering:
        """The steering of the next token's row."""
        return self.rows[self.next]

    def checkpoint_from(self, row: int) -> tuple | None:
        """The judges' states before the first of rows ``row..`` judged ahead (what to put
        back where those rows are not handed out), or None where none was."""
        return next((r.checkpoint for r in self.rows[row:] if r.checkpoint is not None), None)

    def peek(self) -> tuple[int, float, ForwardResult]:
        """The next token, its sampler probability and its row of the verify pass (``logits``
        ``[vocab]``, ``hidden`` rows ``[1, hidden]``); ``advance`` hands it out."""
        j = self.next
        row = ForwardResult(self.out.all_logits[j], {l: h[j:j + 1] for l, h in self.out.hidden.items()})
        return self.tokens[j], self.sampler_probs[j], row

    def advance(self) -> bool:
        """Hand out the peeked token; True if it is already in the small cache (a draft)."""
        self.next += 1
        return self.next <= self.accepted

    @property
    def done(self) -> bool:
        return self.next > self.accepted

    def cut(self, big: Engine, mirror: ContextMirror, fed: bool) -> None:
        """End the block before its next token (a judge changed the step's steering): rewind
        both caches to the non-speculative state before that step's big forward, or after
        it with ``fed`` (the verify row stands for the step's first pass)."""
        self._keep(big, mirror, self.next + (1 if fed else 0), self.next)

    def settle(self, big: Engine, mirror: ContextMirror, eos: bool) -> None:
        """The generation ended inside the block (EOS or a stop string at a drafted token,
        an abort, an interrupt, an error): rewind both caches to the non-speculative state
        after the last handed-out token (with ``eos`` that token never reached the small
        model)."""
        self._keep(big, mirror, self.next, self.next - (1 if eos else 0))

    def _keep(self, big: Engine, mirror: ContextMirror, big_n: int, small_n: int) -> None:
        """Rewind the big cache to keep ``big_n`` of the positions the verify fed (the
        token before the block, then the block's tokens) and the small one to keep the
        block's first ``small_n`` tokens."""
        big.rewind(self.accepted + 1 - big_n)
        mirror.rewind(self.accepted - small_n, *self.states[small_n])


Steer = Callable[[list[int], list[SmallState]], list[RowSteering]]
"""Decides a block's steering from its drafted tokens and the small model's state before
each: one ``RowSteering`` per verify row."""


def draft_and_verify(big: Engine, mirror: ContextMirror, sampler: Sampler, last: int, k: int,
                     capture: tuple[int, ...], steer: Steer) -> Block:
    """Draft ``k`` tokens with the small model, verify them with the big model after
    ``last`` (the token it has not fed yet), each row steered as ``steer`` decides, keep or
    replace them by the rule of speculative sampling (``sampler``'s distributions and
    generator); rewind both caches to the accepted prefix (see ``Block``). A failure or
    interrupt leaves both caches as before."""
    start, fed, big_len = (mirror.hidden, mirror.logits), len(mirror.ids), big.seq_len
    # The small model needs the last draft token when the whole draft is kept. Engines that
    # launch asynchronously get it while the verify runs (the two overlap on the device),
    # taken back on a rejection; others only when it is kept.
    early = big.launches_async and mirror.small.launches_async
    try:
        drafted, qs, states = _draft(mirror, sampler, k, big.identity.vocab_size)
        rows = steer(drafted, states)
        out = big.verify([last, *drafted], [r.deltas for r in rows], capture)
        if early:
            _feed(mirror, drafted[-1], states)
        tokens, probs = _judge_draft(sampler, drafted, qs, out.all_logits)
        a = len(tokens) - 1
        if a == k and not early:
            _feed(mirror, drafted[-1], states)
        big.rewind(k - a)
        mirror.rewind(len(states) - 1 - a, *states[a])  # the fed drafts past the kept ones
    except BaseException:  # back to the start, wherever it stopped
        big.rewind(big.seq_len - big_len)
        mirror.rewind(len(mirror.ids) - fed, *start)
        raise
    del states[a + 1:]
    return Block(tuple(drafted), tokens, probs, out, states, rows)


def _feed(mirror: ContextMirror, token: int, states: list[SmallState]) -> None:
    """Feed ``token`` to the small model and note the state after it."""
    mirror.feed(token)
    states.append((mirror.hidden, mirror.logits))


def _draft(mirror: ContextMirror, sampler: Sampler, k: int, vocab: int
           ) -> tuple[list[int], list[torch.Tensor], list[SmallState]]:
    """``k`` tokens drawn from the mirror's small model, feeding all but the last: the
    tokens, the distributions ``q_i`` ``[vocab]`` (over the big model's ``vocab``) they
    were drawn from, and the small states before each of them."""
    drafted: list[int] = []
    qs: list[torch.Tensor] = []
    states: list[SmallState] = [(mirror.hidden, mirror.logits)]
    for i in range(k):
        qs.append(sampler.probabilities(_fit(mirror.logits, vocab)))
        drafted.append(sampler.draw(qs[-1]))
        if i < k - 1:
            _feed(mirror, drafted[-1], states)
    return drafted, qs, states


def _judge_draft(sampler: Sampler, drafted: list[int], qs: list[torch.Tensor],
                 all_logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """The rule of speculative sampling on verify rows ``all_logits`` ``[k + 1, vocab]``:
    the accepted prefix of ``drafted`` and the token drawn after it (from the residual at
    a rejection, from the last row when all were kept), with the big model's probability
    of each. Greedy (``p`` and ``q`` one-hot) in one pass: the longest prefix matching the
    big model's argmax, then its own token."""
    if sampler.config.temperature == 0:
        choices = all_logits.argmax(-1).tolist()
        a = 0
        while a < len(drafted) and drafted[a] == choices[a]:
            a += 1
        return [*drafted[:a], choices[a]], [1.0] * (a + 1)
    tokens: list[int] = []
    probs: list[float] = []
    for i, x in enumerate(drafted):
        p = sampler.probabilities(all_logits[i])
        if not sampler.accept(float(p[x]), float(qs[i][x])):
            token = sampler.draw(residual(p, qs[i]))
            return tokens + [token], probs + [float(p[token])]
        tokens.append(x)
        probs.append(float(p[x]))
    p = sampler.probabilities(all_logits[len(drafted)])
    token = sampler.draw(p)
    return tokens + [token], probs + [float(p[token])]


def _fit(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The small model's ``logits`` over the big model's ``vocab`` ids (models of one
    tokenizer may pad their embedding tables to different sizes): cut, or padded with -inf."""
    n = logits.shape[-1]
    if n >= vocab:
        return logits[:vocab]
    return torch.cat([logits, logits.new_full((vocab - n,), float("-inf"))])
