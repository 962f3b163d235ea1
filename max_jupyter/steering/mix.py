"""``Mix``: a live, thread-safe set of named steering vectors with coefficients, for one model.

The mix (name -> vector, coefficient, layers) may be changed from any thread (a widget
slider) at any time; ``snapshot`` / ``deltas`` take a consistent view under a lock, so a
change — also one of several entries at once (``update``) — lands whole at the next step.
The combined per-layer delta is cached per mix version and device, so an unchanged mix
costs one lock and one dict lookup per step. Listeners hear of every change (a widget
moves its slider when code changes the mix).

An entry adds (the plain case) or ablates or clamps the residual's projection on its
vector (``MixEntry.op``), at every step or on a ``Schedule``; a steering expression
(docs/steering.md) compiles to entries (``assign`` puts them in at once).

Coefficients are on the readable scale (``SteeringVector.deltas``, docs/vectors.md): an
entry at coefficient c pushes c typical residual norms of the engine's model, shared by
its layers; entries add up.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from max_jupyter.engines import residual
from max_jupyter.engines.base import Engine, LayerDeltas, ModelIdentity
from max_jupyter.engines.intervention import Intervention, additions, combine
from max_jupyter.errors import BadArgumentError, UnknownNameError
from max_jupyter.steering.vector import ModelMismatchError, SteeringVector
from max_jupyter.validation import check_coef, fail


@dataclass(frozen=True)
class Schedule:
    """When an entry applies, by the step of the generation (the step of the forward that
    chooses token ``step``; step 0's forward is the prompt's prefill): ``phase``
    ``"prompt"`` (step 0 only) or ``"response"`` (steps >= 1) or None (both), ``first``
    (steps below it) and ``after`` (steps from it on). ``ALWAYS``: every step."""

    phase: str | None = None
    first: int | None = None
    after: int | None = None

    def active(self, step: int) -> bool:
        return ((self.phase != "prompt" or step == 0) and (self.phase != "response" or step > 0)
                and (self.first is None or step < self.first) and (self.after is None or step >= self.after))

    def __str__(self) -> str:
        return " ".join(p for p in (f"@{self.phase}" if self.phase else "",
                                    f"@first:{self.first}" if self.first is not None else "",
                                    f"@after:{self.after}" if self.after is not None else "") if p)


ALWAYS = Schedule()
OPS = ("add", "ablate", "clamp")


@dataclass(frozen=True)
class MixEntry:
    """One vector in the mix at ``layers`` (None: all of its layers): ``op`` ``"add"`` adds
    ``vector`` at coefficient ``coef``; ``"ablate"`` sets the residual's projection on the
    vector's unit direction to ``target`` (a number, or layer -> value: the vector's stored
    means); ``"clamp"`` limits that projection to ``bounds``; only at the steps of
    ``schedule`` (engines/intervention.py says how the operations compose at a layer)."""

    vector: SteeringVector
    coef: float
    layers: tuple[int, ...] | None
    op: str = "add"
    target: float | Mapping[int, float] = 0.0
    bounds: tuple[float, float] | None = None
    schedule: Schedule = ALWAYS

    def steered(self) -> SteeringVector:
        """The vector at the entry's layers."""
        return self.vector.select(self.layers) if self.layers is not None else self.vector

    def interventions(self, device: torch.device) -> dict[int, Intervention]:
        """An ablation's or clamp's per-layer ``Intervention`` on ``device``."""
        out = {}
        for layer, d in self.steered().directions.items():
            unit = (d / d.norm()).to(device)[None]
            if self.op == "ablate":
                t = self.target[layer] if isinstance(self.target, Mapping) else self.target
                out[layer] = Intervention(ablate=unit, targets=torch.tensor([float(t)], device=device))
            else:
                low, high = (torch.tensor([b], device=device) for b in self.bounds)
                out[layer] = Intervention(clamp=unit, low=low, high=high)
        return out


class MixState(NamedTuple):
    """One consistent view of a mix: its ``version``, each entry's coefficient (do not
    mutate: shared while the mix is unchanged), the combined deltas of the entries that
    apply at every step (None when none) and, per other ``Schedule``, those of its entries."""

    version: int
    coefs: dict[str, float]
    deltas: LayerDeltas | None
    scheduled: tuple[tuple[Schedule, LayerDeltas], ...] = ()


log = logging.getLogger(__name__)

EntryChange = float | SteeringVector | tuple | None
"""For ``update``: a new coefficient, a vector (coefficient 1), ``(vector, coef)`` or
``(vector, coef, layers)``, or None to remove the entry."""


class Mix:
    """Holds named vectors with coefficients for the model ``model`` and combines them."""

    def __init__(self, model: ModelIdentity):
        self.model = model
        self._entries: dict[str, MixEntry] = {}
        self._version = 0
        self._lock = threading.Lock()
        self._cached: tuple[torch.device, torch.dtype, MixState] | None = None
        self._listeners: list[Callable[[Mix], None]] = []

    @classmethod
    def of(cls, vector: SteeringVector, coef: float = 1.0) -> Mix:
        """A mix holding only ``vector`` (named by its label) at ``coef``."""
        mix = cls(vector.model)
        mix.set(vector.label or "vector", vector, coef)
        return mix

    def set(self, name: str, vector: SteeringVector, coef: float = 1.0,
            layers: Iterable[int] | None = None) -> None:
        """Add or replace ``name``. Checks the model, the coefficient and the layers first."""
        entry = self._entry(name, vector, coef, layers)
        _check_total({**self.entries, name: entry})
        with self._lock:
            self._entries[name] = entry
            self._version += 1
        self._notify()

    def _entry(self, name: str, vector: SteeringVector, coef: float,
               layers: Iterable[int] | None) -> MixEntry:
        """A checked entry: the vector's model, the coefficient and the layers."""
        if not isinstance(name, str) or not name:
            raise fail("name", name, "is not a non-empty str", "name the entry, e.g. 'happy'")
        if not isinstance(vector, SteeringVector):
            raise fail("vector", vector, f"is a {type(vector).__name__}, not a SteeringVector",
                       "train, load or build a SteeringVector first")
        vector.check_model(self.model)
        coef = check_coef(f"coef for {name!r}", coef)
        layers = vector.select(layers).layers if layers is not None else None  # checked there
        return MixEntry(vector, coef, layers)

    def set_coef(self, name: str, coef: float) -> None:
        """Change one vector's coefficient (the widget-slider path), atomically."""
        coef = check_coef(f"coef for {name!r}", coef)
        _check_total({**self.entries, name: replace(self._get(name), coef=coef)})
        with self._lock:
            self._entries[name] = replace(self._get(name), coef=coef)
            self._version += 1
        self._notify()

    def update(self, changes: Mapping[str, EntryChange]) -> None:
        """Change several entries at once (see ``EntryChange``); every change is checked
        first, then all apply together, so a generation sees either none or all of them."""
        current = self.entries
        new: dict[str, MixEntry | float | None] = {}
        for name, change in changes.items():
            if change is None:
                if name not in current:
                    raise UnknownNameError(f"no vector named {name!r} in the mix; it has {sorted(current)}.")
                new[name] = None
            elif isinstance(change, (int, float)):  # a bool is refused by the coefficient check
                if name not in current:
                    raise UnknownNameError(f"no vector named {name!r} in the mix to set a "
                                           f"coefficient on; give (vector, coef) to add it.")
                new[name] = check_coef(f"coef for {name!r}", change)  # applied to the entry as it is then
            elif isinstance(change, SteeringVector):
                new[name] = self._entry(name, change, 1.0, None)
            elif isinstance(change, tuple) and len(change) in (2, 3):
                vector, coef, layers = (*change, None)[:3]
                new[name] = self._entry(name, vector, coef, layers)
            else:
                raise fail(f"update[{name!r}]", change, "is not a change of the mix",
                           "give a coefficient, a SteeringVector, (vector, coef) or "
                           "(vector, coef, layers), or None to remove the entry")
        after = {**current, **{n: e if isinstance(e, MixEntry) else replace(current[n], coef=e)
                               for n, e in new.items() if e is not None}}
        _check_total({n: e for n, e in after.items() if new.get(n, e) is not None})
        with self._lock:
            gone = [n for n, e in new.items() if isinstance(e, float) and n not in self._entries]
            if gone:  # removed by another thread since the check: apply nothing
                raise UnknownNameError(f"no vector named {gone[0]!r} in the mix any more.")
            for name, entry in new.items():
                if entry is None:
                    self._entries.pop(name, None)
                elif isinstance(entry, float):
                    self._entries[name] = replace(self._entries[name], coef=entry)
                else:
                    self._entries[name] = entry
            self._version += 1
        self._notify()

    def assign(self, entries: Mapping[str, MixEntry]) -> None:
        """Replace the whole mix by ``entries`` (e.g. a compiled expression) in one change:
        each entry checked for this model, then all apply together."""
        checked = {}
        for name, e in entries.items():
            if not isinstance(e, MixEntry) or e.op not in OPS:
                raise fail(f"entries[{name!r}]", e, "is not a MixEntry", "compile an expression first")
            checked[name] = replace(self._entry(name, e.vector, e.coef, e.layers), op=e.op, target=e.target,
                                    bounds=e.bounds, schedule=e.schedule)
        _check_total(checked)
        with self._lock:
            self._entries = checked
            self._version += 1
        self._notify()

    def remove(self, name: str) -> None:
        with self._lock:
            self._get(name)
            del self._entries[name]
            self._version += 1
        self._notify()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._version += 1
        self._notify()

    def add_listener(self, listener: Callable[[Mix], None]) -> None:
        """Call ``listener(self)`` after every change, on the thread that made it."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Mix], None]) -> None:
        self._listeners.remove(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception:  # the change stands; one broken widget must not undo it
                log.exception("a listener of the steering mix raised")

    def _get(self, name: str) -> MixEntry:
        if name not in self._entries:
            raise UnknownNameError(f"no vector named {name!r} in the mix; it has {sorted(self._entries)}.")
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

    def combined(self, engine: Engine) -> SteeringVector | None:
        """What the whole mix adds to ``engine`` at every step as one vector (``None`` when
        it adds nothing: ablations, clamps and scheduled entries are not in it); at the
        coefficient ``combined.push(engine.residual_norms)`` it adds exactly that."""
        state = self.snapshot(engine)
        adds = _sum_layers([additions(state.deltas)]) if state.deltas else None
        return SteeringVector(adds, self.model, "mix") if adds else None

    def deltas(self, engine: Engine) -> LayerDeltas | None:
        """Per-layer deltas for ``engine`` (checked to be this mix's model), or ``None`` if empty."""
        return self.snapshot(engine).deltas

    def snapshot(self, engine: Engine) -> MixState:
        """The mix as it is now, with its deltas for ``engine`` (checked to be this mix's
        model); version, coefficients and deltas always belong together."""
        if engine.identity != self.model:
            raise ModelMismatchError(f"this mix is for {self.model.describe()}, the engine runs "
                                     f"{engine.identity.describe()}.")
        with self._lock:
            cached = self._cached
            if (cached and cached[2].version == self._version and cached[0] == engine.device
                    and cached[1] == engine.dtype):
                return cached[2]
            version = self._version
            entries = dict(self._entries)
        norms = engine.residual_norms or residual.measure(engine)  # unknown only before
        # this model's first forward, so on an empty cache, which measuring may empty again
        groups: dict[Schedule, list[MixEntry]] = {}
        for e in entries.values():
            groups.setdefault(e.schedule, []).append(e)
        parts = {s: ops for s, es in groups.items() if (ops := _layer_ops(es, norms, engine)) is not None}
        state = MixState(version, {n: e.coef for n, e in entries.items()}, parts.pop(ALWAYS, None),
                         tuple(parts.items()))
        with self._lock:
            self._cached = (engine.device, engine.dtype, state)
        return state

    def __repr__(self) -> str:
        parts = [f"{n}: {e.coef:g} x {e.vector.label or 'vector'}"
                 + (f" @ {list(e.layers)}" if e.layers is not None else "")
                 for n, e in self.entries.items()]
        return f"Mix({'; '.join(parts) or 'empty'})"


def _check_total(entries: Mapping[str, MixEntry]) -> None:
    """Refuse a mix whose entries together would add more than ``MAX_DELTA_RATIO`` typical
    residual norms at a layer, where the model's norms are known (else the engine refuses
    it before its forward). One entry cannot: it adds at most its coefficient at a layer,
    and ``MAX_COEF`` is that bound."""
    norms = residual.known(next(iter(entries.values())).vector.model) if entries else None
    if norms is None:
        return
    total = _sum_layers(e.steered().deltas(e.coef, norms) for e in entries.values()
                        if e.coef != 0 and e.op == "add")
    for layer, delta in (total or {}).items():
        size = float(delta.norm()) / norms[layer]
        if size > residual.MAX_DELTA_RATIO:
            names = ", ".join(f"{n} {e.coef:+g}" for n, e in entries.items())
            raise BadArgumentError(
                f"the mix ({names}) adds {size:.3g} typical residual norms at layer {layer} "
                f"(the bound is {residual.MAX_DELTA_RATIO:g}); lower the coefficients.")


def _sum_layers(parts: Iterable[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor] | None:
    """Per-layer sums of ``parts`` (``None`` when there are none)."""
    total = None
    for part in parts:
        if total is None:
            total = dict(part)
        else:
            for layer, d in part.items():
                total[layer] = total[layer] + d if layer in total else d
    return total


def _layer_ops(entries: list[MixEntry], norms: Mapping[int, float], engine: Engine) -> LayerDeltas | None:
    """Per-layer deltas of ``entries`` for ``engine``: the additions summed (a tensor per
    layer, as always), with each ablation and clamp composed in, in the mix's order."""
    ops = _sum_layers(e.steered().deltas(e.coef, norms, engine.device, engine.dtype)
                      for e in entries if e.coef != 0 and e.op == "add") or {}  # a zero adds nothing
    for e in entries:
        if e.op != "add":
            for layer, op in e.interventions(engine.device).items():
                ops[layer] = combine(ops[layer], op) if layer in ops else op
    return ops or None
