"""``SteeringVector``: per-layer residual-stream directions that know their model.

Vectors are values: ``a + b``, ``a - b``, ``2 * a``, ``-a``, ``a / 2``, ``a.select([3, 4])``
and ``a.normalized()`` return new vectors; nothing mutates. Combining vectors of different
models, or applying one to the wrong model, raises ``ModelMismatchError``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from max_jupyter.engines.base import ModelIdentity, check_layers
from max_jupyter.errors import ModelMismatchError


class SteeringVector:
    """Directions ``{layer: [hidden] float32 CPU tensor}`` for the model ``model``.

    ``layer`` i is the residual stream at the output of decoder block i. Construction
    checks layers, widths and finiteness, and copies the tensors.
    """

    __slots__ = ("directions", "model", "label")

    def __init__(self, directions: Mapping[int, torch.Tensor], model: ModelIdentity, label: str = ""):
        if not directions:
            raise ValueError("a SteeringVector needs at least one layer; got no directions.")
        check_layers(model, directions.keys(), f"steering vector {label!r}")
        clean: dict[int, torch.Tensor] = {}
        for layer, d in sorted(directions.items()):
            d = torch.as_tensor(d).detach().to("cpu", torch.float32).reshape(-1).clone()
            if d.numel() != model.hidden_size:
                raise ValueError(f"steering vector {label!r}: layer {layer} has width {d.numel()}, "
                                 f"but {model.describe()} has hidden size {model.hidden_size}.")
            if not torch.isfinite(d).all():
                raise ValueError(f"steering vector {label!r}: layer {layer} holds NaN or inf; "
                                 f"rebuild it from finite data.")
            clean[int(layer)] = d
        self.directions = clean
        self.model = model
        self.label = label

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.directions)

    def check_model(self, identity: ModelIdentity) -> None:
        """Raise ``ModelMismatchError`` unless this vector was made for ``identity``."""
        if identity != self.model:
            raise ModelMismatchError(
                f"steering vector {self.label!r} was made for {self.model.describe()}, "
                f"not {identity.describe()}; train or load a vector for this model.")

    def _combine(self, other: SteeringVector, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        other.check_model(self.model)
        out = dict(self.directions)
        for layer, d in other.directions.items():
            out[layer] = out[layer] + sign * d if layer in out else sign * d
        op = "+" if sign > 0 else "-"
        return SteeringVector(out, self.model, f"({self.label} {op} {other.label})")

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, coef: float) -> SteeringVector:
        if not isinstance(coef, (int, float)):
            return NotImplemented
        if not math.isfinite(coef):
            raise ValueError(f"coefficient {coef} is not finite; use a finite number.")
        return SteeringVector({l: coef * d for l, d in self.directions.items()}, self.model,
                              f"{coef:g}*{self.label}")

    __rmul__ = __mul__

    def __truediv__(self, coef: float) -> SteeringVector:
        return self * (1.0 / coef)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def select(self, layers: Iterable[int]) -> SteeringVector:
        """The same directions at ``layers`` only (each must be one of ``self.layers``)."""
        layers = list(layers)
        missing = [l for l in layers if l not in self.directions]
        if missing:
            raise IndexError(f"steering vector {self.label!r} has no layer(s) {missing}; "
                             f"it has {list(self.layers)}.")
        return SteeringVector({l: self.directions[l] for l in layers}, self.model, self.label)

    def normalized(self) -> SteeringVector:
        """Each layer's direction scaled to unit L2 norm (zero directions stay zero)."""
        return SteeringVector({l: d / n if (n := d.norm()) > 0 else d
                               for l, d in self.directions.items()}, self.model, self.label)

    def norms(self) -> dict[int, float]:
        return {l: float(d.norm()) for l, d in self.directions.items()}

    def deltas(self, coef: float = 1.0, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> dict[int, torch.Tensor]:
        """``{layer: coef * direction}`` on ``device`` in ``dtype``, ready for an engine."""
        return {l: (coef * d).to(device, dtype) for l, d in self.directions.items()}

    def save(self, path: str | Path) -> None:
        """Write a ``.safetensors`` file (directions + model identity + label in its metadata)."""
        meta = {"model": json.dumps(asdict(self.model)), "label": self.label}
        save_file({f"direction.{l}": d for l, d in self.directions.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Read a file written by ``save``."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "model" not in meta:
            raise ValueError(f"{path} is not a max_jupyter steering vector (no model identity).")
        tensors = load_file(str(path))
        directions = {int(k.split(".")[1]): v for k, v in tensors.items()}
        return cls(directions, ModelIdentity(**json.loads(meta["model"])), meta.get("label", ""))

    def __repr__(self) -> str:
        norms = ", ".join(f"{l}:{n:.3g}" for l, n in self.norms().items())
        return f"SteeringVector({self.label!r}, layers/norms {{{norms}}}, for {self.model.describe()})"
