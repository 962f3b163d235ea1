"""Judges: per step, whether to steer the big model and with which named mixes.

A judge is a small object with one method, ``decide(ctx: JudgeContext) -> Verdict``, and
a few declarative attributes that the orchestrator checks once, before generating:

- ``name``: unique among one orchestrator's judges; names the judge in records and errors.
- ``post_step``: ``False`` — decided before the big model's step, from the small model's
  state after it consumed the previous token (free: the mirror's forward already captured
  it). ``True`` — decided after the step, seeing the big model's logits; a verdict that adds
  a mix makes the orchestrator rewind the big model by one position and re-run the step.
- ``turns_on``: names of the mixes it may turn on (must exist in the orchestrator's
  ``mixes``).
- ``small_layers``: small-model layers it reads; the mirror captures them.
- ``small_model``: identity of the small model its data was made for, or ``None``.
- ``needs_small``, ``needs_shared_vocab``: what it needs from the pair of models.

Several judges compose: a step is steered with the union of the mixes they turn on. A
judge may keep state across steps; ``ctx.step == 0`` begins a new generation. A pre-step
judge whose state can be taken and put back (``checkpoint`` / ``restore``; the built-in
judges can) lets speculative decoding judge drafted tokens ahead of the verify and steer
each verified position as its step would be steered; one that cannot is run on emitted
steps only, and where its decision changes inside a speculative block the block ends.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from max_jupyter.engines.base import ModelIdentity, check_layers
from max_jupyter.errors import BadArgumentError, MaxJupyterError, UnknownNameError, warn_deprecated
from max_jupyter.steering.vector import ModelMismatchError, SteeringVector

DEFAULT_MIX = "default"
"""Name of the mix when the orchestrator is given a single Mix or vector as ``mixes``."""

NO_MIXES: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class JudgeContext:
    """What a judge sees at one step (read-only; tensors live on the engines' devices).

    ``step``: index of the token being chosen (0 = the first generated token).
    ``tokens``: the big model's tokens emitted so far (the live list: do not mutate).
    ``small_hidden``: layer -> ``[hidden_small]``, the small model's residual at its last
    fed position (after it consumed ``tokens[-1]``, or the prompt); empty without a small model.
    ``small_logits``: ``[vocab_small]`` float32, the small model's next-token logits, or None.
    ``big_logits``: ``[vocab]`` float32, the big model's next-token logits of this step's
    first pass (post-step judges only; None before the step).
    ``mixes_on``: post-step: the mixes the first pass ran with; pre-step: empty.
    """

    step: int
    tokens: Sequence[int]
    small_hidden: Mapping[int, torch.Tensor]
    small_logits: torch.Tensor | None
    big_logits: torch.Tensor | None = None
    mixes_on: frozenset[str] = NO_MIXES

    @property
    def steering(self) -> frozenset[str]:
        """Deprecated name of ``mixes_on``."""
        warn_deprecated("JudgeContext.steering", "JudgeContext.mixes_on")
        return self.mixes_on


@dataclass(frozen=True, slots=True, init=False)
class Verdict:
    """A judge's answer: its ``score`` (NaN if it has none) and the names of the mixes to
    turn on (``turn_on``; ``steer=`` is its deprecated name)."""

    score: float
    turn_on: frozenset[str]

    def __init__(self, score: float = math.nan, turn_on: frozenset[str] = NO_MIXES, *,
                 steer: frozenset[str] | None = None):
        if steer is not None:
            warn_deprecated("Verdict(steer=...)", "Verdict(turn_on=...)")
            turn_on = steer
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "turn_on", turn_on)

    @property
    def steer(self) -> frozenset[str]:
        """Deprecated name of ``turn_on``."""
        warn_deprecated("Verdict.steer", "Verdict.turn_on")
        return self.turn_on


OFF = Verdict()


class JudgeError(MaxJupyterError, RuntimeError):
    """A judge raised. ``judge`` and ``step`` say where; ``result`` holds the partial trace
    (a ``GenerationResult``) once the orchestrator has stopped; ``__cause__`` is the error."""

    def __init__(self, judge: str, step: int, error: BaseException):
        super().__init__(f"judge {judge!r} failed at step {step}: {type(error).__name__}: {error}")
        self.judge, self.step = judge, step
        self.result = None


class Judge(ABC):
    """Base of the judges: declarative attributes (see the module) and ``decide``."""

    name: str = "judge"
    post_step: bool = False
    turns_on: tuple[str, ...] = ()
    small_layers: tuple[int, ...] = ()
    small_model: ModelIdentity | None = None
    needs_small: bool = False
    needs_shared_vocab: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "mixes" in vars(cls) and not isinstance(vars(cls)["mixes"], property):
            warn_deprecated(f"{cls.__name__}.mixes", "turns_on")  # the old class attribute
            cls.turns_on = tuple(vars(cls)["mixes"])
            del cls.mixes

    @property
    def mixes(self) -> tuple[str, ...]:
        """Deprecated name of ``turns_on``."""
        warn_deprecated("Judge.mixes", "Judge.turns_on")
        return self.turns_on

    @mixes.setter
    def mixes(self, names: Sequence[str]) -> None:
        warn_deprecated("Judge.mixes", "Judge.turns_on")
        self.turns_on = tuple(names)

    @abstractmethod
    def decide(self, ctx: JudgeContext) -> Verdict:
        """This step's verdict; may update the judge's own state."""

    def checkpoint(self) -> object:
        """The state this judge keeps between steps, as a value ``restore`` puts back
        (speculative decoding runs pre-step judges ahead on drafted tokens, and puts their
        state back where those tokens are not emitted); ``()`` for a judge without state.
        None (the default): it may keep state it cannot give back, so it runs on emitted
        steps only."""
        return None

    def restore(self, checkpoint: object) -> None:
        """Put back the state ``checkpoint`` took. Here: only ``()``, a stateless judge's
        (nothing to do); a judge whose ``checkpoint`` returns state overrides this."""
        if checkpoint != ():
            raise NotImplementedError(f"{type(self).__name__}.checkpoint returns state; "
                                      f"override restore to put it back.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Never(Judge):
    """Never steers (baseline)."""

    def __init__(self, name: str = "never"):
        self.name = name

    def decide(self, ctx: JudgeContext) -> Verdict:
        return OFF

    def checkpoint(self) -> object:
        return ()


class Always(Judge):
    """Steers every step with ``mix`` (baseline: the big model steered throughout)."""

    def __init__(self, mix: str = DEFAULT_MIX, name: str | None = None):
        self.name = name or f"always:{mix}"
        self.turns_on = (mix,)
        self._on = Verdict(math.nan, frozenset(self.turns_on))

    def decide(self, ctx: JudgeContext) -> Verdict:
        return self._on

    def checkpoint(self) -> object:
        return ()


class ProbeJudge(Judge):
    """Turns ``mix`` on while the small model's residual at ``layer`` points along ``vector``.

    Score: the scalar projection ``h · v / |v|`` of the small model's hidden state ``h`` at
    ``layer`` onto the probe direction ``v`` (a ``SteeringVector`` made for the small model).
    Off -> on when the score rises above ``threshold``; on -> off when it falls below
    ``threshold - hysteresis``. After a switch the state is held for ``cooldown`` more
    steps. (To fire on low projections, negate the vector and the threshold.)
    """

    def __init__(self, vector: SteeringVector, layer: int | None = None, threshold: float = 0.0,
                 hysteresis: float = 0.0, cooldown: int = 0, mix: str = DEFAULT_MIX,
                 name: str | None = None):
        if layer is None:
            if len(vector.layers) != 1:
                raise BadArgumentError(f"ProbeJudge: vector {vector.label!r} has layers {list(vector.layers)};"
                                       f" pass layer= to choose one.")
            layer = vector.layers[0]
        direction = vector.select([layer]).directions[layer]
        norm = float(direction.norm())
        if norm == 0:
            raise BadArgumentError(f"ProbeJudge: vector {vector.label!r} is zero at layer {layer}.")
        if hysteresis < 0 or cooldown < 0:
            raise BadArgumentError(f"ProbeJudge: hysteresis ({hysteresis}) and cooldown ({cooldown}) "
                                   f"must be >= 0.")
        self.name = name or f"probe:{vector.label or 'vector'}@{layer}"
        self.turns_on = (mix,)
        self.small_layers = (layer,)
        self.small_model = vector.model
        self.needs_small = True
        self.layer, self.threshold = layer, threshold
        self.hysteresis, self.cooldown = hysteresis, cooldown
        self._unit = direction / norm  # [hidden_small] float32
        self._on_verdict = frozenset(self.turns_on)
        self._on, self._hold = False, 0

    def decide(self, ctx: JudgeContext) -> Verdict:
        if ctx.step == 0:
            self._on, self._hold = False, 0
        h = ctx.small_hidden[self.layer]  # [hidden_small]
        if self._unit.device != h.device:
            self._unit = self._unit.to(h.device)
        score = float(h.float() @ self._unit)
        if self._hold:
            self._hold -= 1
        elif not self._on and score > self.threshold:
            self._on, self._hold = True, self.cooldown
        elif self._on and score < self.threshold - self.hysteresis:
            self._on, self._hold = False, self.cooldown
        return Verdict(score, self._on_verdict if self._on else NO_MIXES)

    def checkpoint(self) -> object:
        return self._on, self._hold

    def restore(self, checkpoint: object) -> None:
        self._on, self._hold = checkpoint


class DivergenceJudge(Judge):
    """Post-step: turns ``mix`` on (re-running the step) when the big model is unsure.

    ``measure="entropy"``: score = entropy (nats) of the big model's next-token distribution.
    ``measure="kl"``: score = KL(big || small) between the two next-token distributions
    (needs a small model with the same vocabulary). Fires when the score exceeds ``threshold``.
    """

    post_step = True

    def __init__(self, threshold: float, measure: str = "entropy", mix: str = DEFAULT_MIX,
                 name: str | None = None):
        if measure not in ("entropy", "kl"):
            raise BadArgumentError(f"DivergenceJudge: unknown measure {measure!r}; use 'entropy' or 'kl'.")
        self.name = name or f"{measure}>{threshold:g}"
        self.threshold, self.measure = threshold, measure
        self.turns_on = (mix,)
        self.needs_small = self.needs_shared_vocab = measure == "kl"
        self._on = frozenset(self.turns_on)

    def decide(self, ctx: JudgeContext) -> Verdict:
        if self.measure == "entropy":
            logp = torch.log_softmax(ctx.big_logits, -1)  # [vocab]
            score = float(-(logp.exp() * logp).sum())
        else:
            n = min(ctx.big_logits.shape[-1], ctx.small_logits.shape[-1])
            logp = torch.log_softmax(ctx.big_logits[:n], -1)  # [n]
            logq = torch.log_softmax(ctx.small_logits[:n].to(logp.device), -1)
            score = float((logp.exp() * (logp - logq)).sum())
        return Verdict(score, self._on if score > self.threshold else NO_MIXES)

    def checkpoint(self) -> object:
        return ()


class FunctionJudge(Judge):
    """A judge from a callable ``fn(ctx: JudgeContext) -> bool | Verdict``.

    ``True`` turns ``mix`` on (one name or several), ``False`` leaves it off; a ``Verdict``
    is used as given (its mixes must be among ``mix``). Declare the small layers it reads
    in ``small_layers``. ``stateless``: ``fn``'s answer depends on ``ctx`` alone (it keeps
    nothing between calls), so speculative decoding may call it ahead on drafted tokens
    that are then not emitted (``Judge.checkpoint``); by default it is called on emitted
    steps only.
    """

    def __init__(self, fn: Callable[[JudgeContext], bool | Verdict], *, post_step: bool = False,
                 mix: str | Sequence[str] = DEFAULT_MIX, small_layers: Sequence[int] = (),
                 name: str | None = None, stateless: bool = False):
        self.fn = fn
        self.stateless = stateless
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.post_step = post_step
        self.turns_on = (mix,) if isinstance(mix, str) else tuple(mix)
        self.small_layers = tuple(small_layers)
        self.needs_small = bool(small_layers)
        self._on = Verdict(math.nan, frozenset(self.turns_on))

    def decide(self, ctx: JudgeContext) -> Verdict:
        out = self.fn(ctx)
        if isinstance(out, Verdict):
            return out
        if isinstance(out, (bool, torch.Tensor)):
            return self._on if out else OFF
        raise TypeError(f"returned {type(out).__name__}; a judge function returns a bool or a Verdict.")

    def checkpoint(self) -> object:
        return () if self.stateless else None


JudgeLike = Judge | Callable[[JudgeContext], bool | Verdict]


def as_judges(judges: JudgeLike | Sequence[JudgeLike] | None) -> list[Judge]:
    """A list of judges from one judge, one callable, or a sequence of either."""
    if judges is None:
        return []
    if isinstance(judges, Judge) or callable(judges):
        judges = [judges]
    return [j if isinstance(j, Judge) else FunctionJudge(j) for j in judges]


def check_judges(judges: Sequence[Judge], mixes: Collection[str], big: ModelIdentity,
                 small: ModelIdentity | None, shared_vocab: bool) -> None:
    """Raise a clear error if a judge cannot run with these models and mixes."""
    names = [j.name for j in judges]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BadArgumentError(f"judge names must be unique; {dupes} appear more than once (pass name=).")
    for j in judges:
        if (j.needs_small or j.small_model is not None) and small is None:
            raise BadArgumentError(f"judge {j.name!r} reads the small model, but the orchestrator has none.")
        if j.needs_shared_vocab and not shared_vocab:
            raise BadArgumentError(f"judge {j.name!r} compares next-token distributions, but the big and "
                                   f"small models have different vocabularies.")
        if j.small_model is not None and j.small_model != small:
            hint = " (that is the big model)" if j.small_model == big else ""
            raise ModelMismatchError(
                f"judge {j.name!r} was made for {j.small_model.describe()}{hint}, but the small "
                f"model is {small.describe()}; train its vector on the small model.")
        if small is not None and j.small_layers:
            check_layers(small, j.small_layers, f"judge {j.name!r}")
        unknown = [m for m in j.turns_on if m not in mixes]
        if unknown:
            raise UnknownNameError(f"judge {j.name!r} turns on mix(es) {unknown}, but the orchestrator has "
                                   f"{sorted(mixes) or 'no mixes'}; pass mixes={{name: Mix}}.")
