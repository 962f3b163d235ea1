"""Steering as values that travel to a pool's workers: a vector as it is, a mix as a copy
of its entries (a ``Mix`` holds a lock and listeners, which stay in the notebook), and a
{vector name: coefficient} mapping resolved against the notebook's vector library first.
Every value is checked against the pool's model here, before any work is sent."""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.errors import ModelMismatchError, UnknownNameError
from max_jupyter.steering.mix import Mix, MixEntry
from max_jupyter.steering.vector import SteeringVector
from max_jupyter.validation import fail


@dataclass(frozen=True)
class MixValue:
    """The entries of a ``Mix`` as they were when it was sent; ``mix()`` rebuilds a live
    ``Mix`` of them on the worker (same entries, same order: the same deltas)."""

    model: ModelIdentity
    entries: tuple[tuple[str, MixEntry], ...]

    def mix(self) -> Mix:
        mix = Mix(self.model)
        for name, entry in self.entries:
            mix.set(name, entry.vector, entry.coef, entry.layers)
        return mix


SteeringValue = SteeringVector | MixValue | None
"""What a worker receives as one generation's steering."""


def steering_value(steering: object, vectors: MutableMapping[str, SteeringVector],
                   model: ModelIdentity, argument: str = "steering") -> SteeringValue:
    """``steering`` (None, a vector, a ``Mix`` or {vector name: coef} of ``vectors``) as a
    value for a worker running ``model``; a vector or mix of another model is refused
    (``ModelMismatchError``), as is a name the library does not have."""
    if steering is None:
        return None
    if isinstance(steering, SteeringVector):
        _check_model(argument, steering.label or "vector", steering.model, model)
        return steering
    if isinstance(steering, Mix):
        _check_model(argument, "mix", steering.model, model)
        return MixValue(steering.model, tuple(steering.entries.items()))
    if isinstance(steering, Mapping):
        mix = Mix(model)
        for name, coef in steering.items():
            if not isinstance(name, str) or name not in vectors:
                raise UnknownNameError(f"{argument}: no vector named {name!r} in the pool's library; "
                                       f"it has {sorted(vectors) or 'none'} (pool.vectors).")
            vector = vectors[name]
            _check_model(f"{argument}[{name!r}]", name, vector.model, model)
            mix.set(name, vector, coef)
        return MixValue(model, tuple(mix.entries.items()))
    raise fail(argument, steering, f"is a {type(steering).__name__}, not steering",
               "give a SteeringVector, a Mix or {vector name: coefficient}")


def local_steering(value: SteeringValue) -> SteeringVector | Mix | None:
    """On the worker: the steering a ``SteeringValue`` stands for."""
    return value.mix() if isinstance(value, MixValue) else value


def _check_model(argument: str, what: str, have: ModelIdentity, want: ModelIdentity) -> None:
    if have != want:
        raise ModelMismatchError(f"{argument}: {what} was made for {have.describe()}, but the pool's "
                                 f"workers run {want.describe()}; use a vector of this model.")
