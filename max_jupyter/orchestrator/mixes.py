"""``Mixes``: the named steering mixes that judges turn on and off for one engine.

Each mix is a ``SteeringController`` (changeable from any thread: a widget slider); a
fixed ``SteeringVector`` becomes a one-vector mix at coefficient 1. ``deltas(names)`` returns the summed per-layer
deltas of the named mixes, snapshotting each controller once, so a change made by another
thread lands whole at the next step. The sum is cached per set of names and the mixes'
versions: an unchanged mix costs a few dict lookups per step.
"""
from __future__ import annotations

from collections.abc import Mapping

from max_jupyter.engines.base import Engine, LayerDeltas
from max_jupyter.orchestrator.judges import DEFAULT_MIX
from max_jupyter.orchestrator.types import Steering, as_mix
from max_jupyter.steering.controller import SteeringController


class Mixes:
    """Named mixes for ``engine``; a single controller or vector is named ``DEFAULT_MIX``."""

    def __init__(self, engine: Engine, steering: Steering | Mapping[str, Steering] = None):
        if steering is None:
            steering = {}
        elif not isinstance(steering, Mapping):
            steering = {DEFAULT_MIX: steering}
        self.engine = engine
        self.named: dict[str, SteeringController] = {n: as_mix(m) for n, m in steering.items()}
        for mix in self.named.values():
            mix.deltas(engine)  # raises now if a mix is for another model
        self._cache: dict[frozenset[str], tuple[tuple[int, ...], LayerDeltas | None]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.named

    def __iter__(self):
        return iter(self.named)

    def deltas(self, names: frozenset[str]) -> LayerDeltas | None:
        """Summed deltas of the mixes ``names`` (``None`` when empty); do not mutate them."""
        if not names:
            return None
        mixes = [self.named[n] for n in sorted(names)]
        # Versions are read before the deltas, so a cached sum is never older than its key.
        versions = tuple(m.version for m in mixes)
        cached = self._cache.get(names)
        if cached is not None and cached[0] == versions:
            return cached[1]
        total: dict | None = None
        for mix in mixes:
            d = mix.deltas(self.engine)
            if d is None:
                continue
            if total is None:
                total = dict(d)
            else:
                for layer, delta in d.items():
                    total[layer] = total[layer] + delta if layer in total else delta
        self._cache[names] = (versions, total)
        return total
