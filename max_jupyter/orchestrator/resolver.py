"""``SteeringResolver``: the steering of one engine at each step — mixes that always apply
(``steering``), and named mixes (``mixes``) that judges turn on and off.

Each is a ``Mix`` (changeable from any thread: a widget slider); a fixed ``SteeringVector``
becomes a one-vector mix at coefficient 1. ``resolve(names)`` snapshots every mix involved
once and returns the summed per-layer deltas of the always-on mixes plus the named ones, so
a change made by another thread lands whole at the next step. Given the step, entries with
a ``Schedule`` (``@response``, ``@first:N``, ...) join the sum at the steps they apply.
Summing composes interventions (engines/intervention.py: ``combine``). The sum is cached
per set of names, the schedules that apply and the mixes' versions: an unchanged step
costs a few lock-and-lookups.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from max_jupyter.engines.base import Engine, LayerDeltas
from max_jupyter.engines.intervention import combine
from max_jupyter.orchestrator.judges import DEFAULT_MIX
from max_jupyter.orchestrator.types import Steering, as_mix
from max_jupyter.steering.mix import Mix

NO_COEFS: dict[str, float] = {}


class SteeringResolver:
    """Steering for ``engine``: ``always`` apply at every step (the first is the live mix
    whose coefficients the trace records); ``named`` ones only when a judge turns them on.
    A single mix or vector given as ``mixes`` is named ``DEFAULT_MIX``."""

    def __init__(self, engine: Engine, mixes: Steering | Mapping[str, Steering] = None,
                 always: Sequence[Steering] = ()):
        if mixes is None:
            mixes = {}
        elif not isinstance(mixes, Mapping):
            mixes = {DEFAULT_MIX: mixes}
        self.engine = engine
        self.named: dict[str, Mix] = {n: as_mix(m) for n, m in mixes.items()}
        self.always: list[Mix] = [as_mix(m) for m in always if m is not None]
        for mix in [*self.named.values(), *self.always]:
            mix.snapshot(engine)  # raises now if a mix is for another model
        self._cache: dict[tuple, tuple[tuple[int, ...], LayerDeltas | None]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.named

    def __iter__(self):
        return iter(self.named)

    def live_coefs(self) -> dict[str, float]:
        """The live mix's coefficients now (the first always-on mix; empty without one;
        do not mutate)."""
        return self.always[0].snapshot(self.engine).coefs if self.always else NO_COEFS

    def resolve(self, names: frozenset[str], step: int | None = None
                ) -> tuple[LayerDeltas | None, dict[str, float]]:
        """Summed deltas of the always-on mixes and the mixes ``names`` (``None`` when
        nothing steers; do not mutate them) at ``step`` (None: only the entries that apply
        at every step), and the live mix's coefficients in that sum."""
        states = [m.snapshot(self.engine) for m in self.always]
        states += [self.named[n].snapshot(self.engine) for n in sorted(names)]
        coefs = states[0].coefs if self.always else NO_COEFS
        versions = tuple(s.version for s in states)
        on = frozenset(s for state in states for s, _ in state.scheduled
                       if step is not None and s.active(step))
        cached = self._cache.get((names, on))
        if cached is not None and cached[0] == versions:
            return cached[1], coefs
        total: dict | None = None
        for state in states:
            for deltas in (state.deltas, *(d for s, d in state.scheduled if s in on)):
                if deltas is None:
                    continue
                if total is None:
                    total = dict(deltas)
                else:
                    for layer, delta in deltas.items():
                        total[layer] = combine(total[layer], delta) if layer in total else delta
        self._cache[(names, on)] = (versions, total)
        return total, coefs
