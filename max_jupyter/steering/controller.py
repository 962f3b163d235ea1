"""``SteeringController``: the active mix of steering vectors for one model.

The mix (name -> vector, coefficient, layers) may be changed from any thread (a widget
slider) at any time; ``deltas`` takes a consistent snapshot under a lock, so a change
lands whole at the next step. The combined per-layer delta is cached per mix version and
device, so an unchanged mix costs one lock and one dict lookup per step.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from max_jupyter.engines.base import Engine, LayerDeltas, ModelIdentity
from max_jupyter.steering.vector import ModelMismatchError, SteeringVector


@dataclass(frozen=True)
class MixEntry:
    """One vector in the mix: ``coef * vector`` at ``layers`` (None: all of its layers)."""

    vector: SteeringVector
    coef: float
    layers: tuple[int, ...] | None

    def effective(self) -> SteeringVector:
        return self.coef * (self.vector.select(self.layers) if self.layers is not None else self.vector)


class SteeringController:
    """Holds named vectors with coefficients for the model ``model`` and combines them."""

    def __init__(self, model: ModelIdentity):
        self.model = model
        self._entries: dict[str, MixEntry] = {}
        self._version = 0
        self._lock = threading.Lock()
        self._cached: tuple[int, torch.device, torch.dtype, LayerDeltas] | None = None

    @classmethod
    def of(cls, vector: SteeringVector, coef: float = 1.0) -> SteeringController:
        """A mix holding only ``vector`` (named by its label) at ``coef``."""
        mix = cls(vector.model)
        mix.set(vector.label or "vector", vector, coef)
        return mix

    def set(self, name: str, vector: SteeringVector, coef: float = 1.0,
            layers: Iterable[int] | None = None) -> None:
        """Add or replace ``name``. Checks the model, the coefficient and the layers first."""
        vector.check_model(self.model)
        if not math.isfinite(coef):
            raise ValueError(f"coefficient for {name!r} is {coef}; use a finite number.")
        entry = MixEntry(vector, float(coef), tuple(layers) if layers is not None else None)
        entry.effective()  # raises on layers the vector lacks
        with self._lock:
            self._entries[name] = entry
            self._version += 1

    def set_coef(self, name: str, coef: float) -> None:
        """Change one vector's coefficient (the widget-slider path), atomically."""
        if not math.isfinite(coef):
            raise ValueError(f"coefficient for {name!r} is {coef}; use a finite number.")
        with self._lock:
            self._entries[name] = replace(self._get(name), coef=float(coef))
            self._version += 1

    def remove(self, name: str) -> None:
        with self._lock:
            self._get(name)
            del self._entries[name]
            self._version += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._version += 1

    def _get(self, name: str) -> MixEntry:
        if name not in self._entries:
            raise KeyError(f"no vector named {name!r} in the mix; it has {sorted(self._entries)}.")
        return self._entries[name]

    @property
    def entries(self) -> dict[str, MixEntry]:
        with self._lock:
            return dict(self._entries)

    @property
    def version(self) -> int:
        """Increases with every change of the mix."""
        return self._version

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def combined(self) -> SteeringVector | None:
        """The whole mix as one vector (``None`` when empty)."""
        return _sum(self.entries.values())

    def deltas(self, engine: Engine) -> LayerDeltas | None:
        """Per-layer deltas for ``engine`` (checked to be this mix's model), or ``None`` if empty."""
        if engine.identity != self.model:
            raise ModelMismatchError(f"this mix is for {self.model.describe()}, the engine runs "
                                     f"{engine.identity.describe()}.")
        with self._lock:
            cached = self._cached
            if cached and cached[0] == self._version and cached[1] == engine.device and cached[2] == engine.dtype:
                return cached[3]
            version = self._version
            entries = list(self._entries.values())
        total = _sum(entries)
        deltas = total.deltas(1.0, engine.device, engine.dtype) if total is not None else None
        with self._lock:
            self._cached = (version, engine.device, engine.dtype, deltas)
        return deltas

    def __repr__(self) -> str:
        parts = [f"{n}: {e.coef:g} x {e.vector.label or 'vector'}"
                 + (f" @ {list(e.layers)}" if e.layers is not None else "")
                 for n, e in self.entries.items()]
        return f"SteeringController({'; '.join(parts) or 'empty'})"


def _sum(entries: Iterable[MixEntry]) -> SteeringVector | None:
    total = None
    for e in entries:
        total = e.effective() if total is None else total + e.effective()
    return total
