"""``SteeringVector``: per-layer residual-stream directions that know their model, and what a
coefficient of one adds to the model (``deltas``: the coefficient scale, docs/vectors.md).

Vectors are values: ``a + b``, ``a - b``, ``2 * a``, ``-a``, ``a / 2``, ``a.select([3, 4])``
and ``a.normalized()`` return new vectors; nothing mutates. Combining vectors of different
models, or applying one to the wrong model, raises ``ModelMismatchError``; bad layers,
shapes or coefficients raise ``BadArgumentError``; a damaged file ``CorruptFileError``.
"""
from __future__ import annotations

import json
import numbers
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.engines.residual import check_finite_norms
from max_jupyter.errors import CorruptFileError, ModelMismatchError
from max_jupyter.steering.storefile import payload_checksum
from max_jupyter.validation import check_coef, check_layers, check_real, fail, show

FORMAT = "max_jupyter.steering_vector/1"


class SteeringVector:
    """Directions ``{layer: [hidden] float32 CPU tensor}`` for the model ``model``.

    ``layer`` i is the residual stream at the output of decoder block i. Construction
    checks the layers (ints in range), each direction's shape (exactly ``[hidden]``: a
    ``[2, 288]`` tensor is refused, not flattened), finiteness (also of each norm: every
    sum, product and selection is built here, so ``(v * 1e30) * 1e30`` is refused as it is
    made), and copies the tensors. The values stay as trained or imported (files and other
    tools keep them raw), but their length does not steer: coefficient ``c`` adds ``c``
    typical residual norms in all, shared by the layers as the values share it
    (``deltas``), so ``2 * v`` steers as ``v`` does; give strength with the coefficient.
    """

    __slots__ = ("directions", "model", "label")

    def __init__(self, directions: Mapping[int, torch.Tensor], model: ModelIdentity, label: str = ""):
        if not isinstance(model, ModelIdentity):
            raise fail("model", model, f"is a {type(model).__name__}, not a ModelIdentity",
                       "pass engine.identity")
        label = "" if label is None else label
        if not isinstance(label, str):
            raise fail("label", label, "is not a str", "pass a name such as 'happy'")
        if not isinstance(directions, Mapping) or not directions:
            raise fail("directions", directions, "is not a non-empty mapping",
                       f"give {{layer: tensor of shape [{model.hidden_size}]}} with at least one layer")
        layers = check_layers(model, list(directions), "directions")
        self.directions = {layer: _direction(d, layer, model, label)
                           for layer, d in sorted(zip(layers, directions.values()), key=lambda p: p[0])}
        check_finite_norms(self.directions, f"vector {label!r}")
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
        if not isinstance(coef, numbers.Real):  # bool is Real: refused by check_real
            return NotImplemented
        coef = check_real("factor", coef)  # any finite factor: the values are not steered by length
        return SteeringVector({l: coef * d for l, d in self.directions.items()}, self.model,
                              f"{coef:g}*{self.label}")

    __rmul__ = __mul__

    def __truediv__(self, coef: float) -> SteeringVector:
        if not isinstance(coef, numbers.Real):
            return NotImplemented
        if check_real("divisor", coef) == 0:
            raise fail("divisor", coef, "is zero", "divide by a non-zero number")
        return self * (1.0 / coef)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def select(self, layers: Iterable[int]) -> SteeringVector:
        """The same directions at ``layers`` only (each must be one of ``self.layers``)."""
        layers = check_layers(self.model, layers, "layers")
        missing = [l for l in layers if l not in self.directions]
        if missing:
            raise fail("layers", list(layers), f"names layer(s) {missing} that vector "
                       f"{self.label!r} has no direction at", f"choose among {list(self.layers)}")
        return SteeringVector({l: self.directions[l] for l in layers}, self.model, self.label)

    def normalized(self) -> SteeringVector:
        """Each layer's direction scaled to unit L2 norm (zero directions stay zero)."""
        return SteeringVector({l: d / n if (n := d.norm()) > 0 else d
                               for l, d in self.directions.items()}, self.model, self.label)

    def norms(self) -> dict[int, float]:
        return {l: float(d.norm()) for l, d in self.directions.items()}

    def push(self, norms: Mapping[int, float]) -> float:
        """How far the values as they are push a model whose typical residual norms are
        ``norms`` (``engine.residual_norms``): ``sum |v_layer| / norms[layer]``, in typical
        residual norms. It is the coefficient that adds the values unchanged, so a raw
        coefficient ``r`` (repeng, llama.cpp) is the coefficient ``r * push(norms)``."""
        return sum(float(d.norm()) / norms[l] for l, d in self.directions.items())

    def deltas(self, coef: float, norms: Mapping[int, float], device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> dict[int, torch.Tensor]:
        """What coefficient ``coef`` adds to a model whose typical residual norms are
        ``norms``: ``coef / push(norms)`` times the values, on ``device`` in ``dtype``. So
        the layers together push ``coef`` typical residual norms (``|delta| / norm`` summed
        over the layers), shared as the vector's own values share it, whatever the vector's
        length: the coefficient scale of docs/vectors.md. A zero vector adds zeros."""
        coef = check_coef("coef", coef)
        push = self.push(norms)
        scale = coef / push if push > 0 else 0.0
        return {l: (scale * d).to(device, dtype) for l, d in self.directions.items()}

    def checksum(self) -> str:
        """sha256 (hex) of the payload: each layer's index and float32 little-endian bytes
        (the checksum the store keeps per version, too)."""
        return payload_checksum((layer, d.contiguous().numpy().astype("<f4").tobytes())
                                for layer, d in self.directions.items())

    def save(self, path: str | os.PathLike) -> None:
        """Write a ``.safetensors`` file: tensors ``direction.<layer>``; metadata: the model
        identity, the label, the format and the payload's sha256 (checked by ``load``).

        Written atomically (a temporary file in the same folder, then renamed); a missing
        folder or an unwritable place raises ``BadArgumentError`` naming ``path``.
        """
        target = _user_path(path)
        if not target.parent.is_dir():
            raise fail("path", str(path), "is in a folder that does not exist",
                       f"create it first: Path({str(target.parent)!r}).mkdir(parents=True)", None)
        if target.is_dir():
            raise fail("path", str(path), "is a folder", "give a file name such as 'happy.safetensors'",
                       None)
        meta = {"format": FORMAT, "model": json.dumps(asdict(self.model)), "label": self.label,
                "sha256": self.checksum()}
        data = save_bytes({f"direction.{l}": d for l, d in self.directions.items()}, metadata=meta)
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise fail("path", str(path), f"cannot be written ({e.strerror or e})",
                       "choose a folder you can write to", None) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        """Read a file written by ``save``. A file that is not one, or whose payload does not
        match its checksum, raises ``CorruptFileError`` naming ``path``."""
        source = _user_path(path)
        if not source.is_file():
            raise fail("path", str(path), "is not a file",
                       "check the path (saved with SteeringVector.save)", None)
        data = source.read_bytes()
        meta = _read_metadata(data, path)
        try:
            tensors = load_bytes(data)
            model = ModelIdentity(**json.loads(meta["model"]))
            _check_identity_fields(model)
            layers = [_layer_of_key(k) for k in tensors]
            vector = cls(dict(zip(layers, tensors.values())), model, meta.get("label", ""))
        except Exception as e:
            raise CorruptFileError(f"{path} is not a valid max_jupyter steering vector "
                                   f"({type(e).__name__}: {e}); re-save it with SteeringVector.save.") from None
        if vector.checksum() != meta["sha256"]:
            raise CorruptFileError(f"{path}: the directions do not match the checksum saved with them "
                                   f"(the file was altered or damaged); re-save or re-train the vector.")
        return vector

    def __repr__(self) -> str:
        norms = ", ".join(f"{l}:{n:.3g}" for l, n in self.norms().items())
        return f"SteeringVector({self.label!r}, layers/norms {{{norms}}}, for {self.model.describe()})"


def _direction(d: object, layer: int, model: ModelIdentity, label: str) -> torch.Tensor:
    """``d`` as a float32 CPU copy of shape exactly ``[hidden]``, finite."""
    name = f"directions[{layer}]"
    try:
        t = torch.as_tensor(d).detach()
    except (TypeError, ValueError, RuntimeError):
        raise fail(name, d, "is not a tensor", f"give a tensor of shape [{model.hidden_size}]") from None
    if t.shape != (model.hidden_size,):
        raise fail(name, f"<tensor of shape {list(t.shape)}>", f"does not fit {model.describe()}",
                   f"give one direction of shape [{model.hidden_size}] per layer (it is never "
                   f"flattened or broadcast)")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise fail(name, f"<tensor of dtype {t.dtype}>", "is not real-valued", "give a float tensor")
    t = t.to("cpu", torch.float32).clone()
    if not torch.isfinite(t).all():
        raise fail(name, f"<tensor in vector {label!r}>", "holds NaN or inf", "rebuild it from finite data")
    return t


def _user_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise fail("path", path, f"is a {type(path).__name__}", "pass a str or pathlib.Path")
    return Path(path).expanduser()


def _read_metadata(data: bytes, path: object) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header; ``CorruptFileError`` unless it
    holds this format's keys."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError):
        raise CorruptFileError(f"{path} is not a safetensors file; save vectors with "
                               f"SteeringVector.save.") from None
    missing = [k for k in ("model", "sha256") if not isinstance(meta.get(k), str)]
    if missing:
        raise CorruptFileError(f"{path} is not a max_jupyter steering vector (no {' or '.join(missing)} "
                               f"in its metadata); import other formats with "
                               f"max_jupyter.steering.interchange.import_vector.")
    return meta


def _check_identity_fields(model: ModelIdentity) -> None:
    for f in fields(model):
        expected = str if f.name in ("architecture", "fingerprint") else int
        if type(getattr(model, f.name)) is not expected:
            raise ValueError(f"model identity field {f.name} is {show(getattr(model, f.name))}")


def _layer_of_key(key: str) -> int:
    prefix, _, index = key.partition(".")
    if prefix != "direction" or not index.isdigit():
        raise ValueError(f"unexpected tensor {key!r} (expected direction.<layer>)")
    return int(index)
