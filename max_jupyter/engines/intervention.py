"""Interventions on the residual stream at one layer: what an engine does there besides
capturing it.

A layer's entry in an engine's ``deltas`` is either a ``[hidden]`` tensor (add it: the
plain case) or an ``Intervention``, which composes three operations, applied to every fed
position (row) independently, in this order:

1. **ablation** of each direction ``u`` in ``ablate`` (unit rows), in the order given:
   ``x <- x - (x.u - t) u``, so the projection on ``u`` becomes its target ``t``
   (``targets``; 0 is plain directional ablation, a stored mean is mean-ablation);
2. **clamp** of each direction ``u`` in ``clamp``, in order: the projection ``x.u`` is
   limited to ``[low, high]`` (``x <- x + (clip(x.u) - x.u) u``);
3. **add**: ``x <- x + add``.

Additions come last so that what a mix adds at a layer is never removed by an ablation of
the same layer. Half-precision rows are projected in float32 (an fp16 dot product over a
few thousand channels loses the 1e-3 an ablation promises).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from max_jupyter.errors import BadArgumentError
from max_jupyter.validation import ModelShape, check_deltas, check_layers


@dataclass(frozen=True, eq=False)
class Intervention:
    """One layer's operations (see the module): ``add`` ``[hidden]`` or None; ``ablate``
    ``[k, hidden]`` unit directions with ``targets`` ``[k]``; ``clamp`` ``[m, hidden]`` unit
    directions with ``low`` / ``high`` ``[m]`` (``-inf`` / ``inf`` for an open side). Shapes,
    finiteness and unit norms are checked when built (``BadArgumentError``)."""

    add: torch.Tensor | None = None
    ablate: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    clamp: torch.Tensor | None = None
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None

    def __post_init__(self):
        width = self.width
        if self.add is not None and (self.add.dim() != 1 or not torch.isfinite(self.add).all()):
            raise BadArgumentError(f"Intervention add has shape {list(self.add.shape)} or non-finite "
                                   f"values; give one finite [hidden] tensor.")
        for rows, values, what in ((self.ablate, (self.targets,), "ablate"),
                                   (self.clamp, (self.low, self.high), "clamp")):
            if rows is None:
                if any(v is not None for v in values):
                    raise BadArgumentError(f"Intervention {what}: bounds or targets without directions.")
                continue
            if rows.dim() != 2 or rows.shape[1] != width or any(
                    v is None or v.shape != (rows.shape[0],) for v in values):
                raise BadArgumentError(f"Intervention {what} has directions {list(rows.shape)} and "
                                       f"values {[None if v is None else list(v.shape) for v in values]}; "
                                       f"give [k, hidden] unit rows and [k] values.")
            norms = rows.float().norm(dim=1)
            if not torch.isfinite(rows).all() or not ((norms - 1).abs() < 1e-3).all():
                raise BadArgumentError(f"Intervention {what}: the directions must be finite unit "
                                       f"vectors (norms {norms.tolist()}); normalise them.")
        if self.targets is not None and not torch.isfinite(self.targets).all():
            raise BadArgumentError("Intervention targets must be finite.")
        if self.clamp is not None and not (self.low <= self.high).all():
            raise BadArgumentError(f"Intervention clamp: low {self.low.tolist()} above high "
                                   f"{self.high.tolist()}; give low <= high.")

    @property
    def width(self) -> int:
        """The hidden size the operations are for."""
        for t in (self.add, self.ablate, self.clamp):
            if t is not None:
                return t.shape[-1]
        raise BadArgumentError("an Intervention needs add, ablate or clamp.")

    @property
    def device(self) -> torch.device:
        return next(t for t in (self.add, self.ablate, self.clamp) if t is not None).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the added tensor (the directions stay float32)."""
        return self.add.dtype if self.add is not None else torch.float32

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Intervention:
        """On ``device``; ``add`` in ``dtype``, directions and values in float32 (``self``
        where it is so already)."""
        if self.device == torch.device(device) and (self.add is None or self.add.dtype == dtype):
            return self

        def move(t, d):
            return None if t is None else t.to(device, d)
        return Intervention(move(self.add, dtype), move(self.ablate, torch.float32),
                            move(self.targets, torch.float32), move(self.clamp, torch.float32),
                            move(self.low, torch.float32), move(self.high, torch.float32))

    @functools.cached_property
    def parts(self) -> tuple[torch.Tensor, ...]:
        """The tensors it has, in the order of the fields."""
        return tuple(t for t in (self.add, self.ablate, self.targets, self.clamp, self.low, self.high)
                     if t is not None)

    @functools.cached_property
    def label(self) -> str:
        """What runs, in order: e.g. ``"ablate1+clamp1+add"`` (its shapes cannot change:
        worked out once)."""
        parts = [f"ablate{len(self.ablate)}" if self.ablate is not None else "",
                 f"clamp{len(self.clamp)}" if self.clamp is not None else "",
                 "add" if self.add is not None else ""]
        return "+".join(p for p in parts if p)


LayerOp = torch.Tensor | Intervention
"""One layer's entry in an engine's deltas: a ``[hidden]`` tensor to add, or an Intervention."""


def check_ops(identity: ModelShape, deltas: object) -> dict[int, LayerOp]:
    """An engine's ``deltas`` checked: known int layers, each a ``[hidden]`` tensor (see
    ``validation.check_deltas``) or an ``Intervention`` of the model's width."""
    if not isinstance(deltas, Mapping) or not any(isinstance(d, Intervention) for d in deltas.values()):
        return check_deltas(identity, deltas)
    layers = check_layers(identity, deltas.keys(), "deltas")
    check_deltas(identity, {l: d for l, d in deltas.items() if not isinstance(d, Intervention)})
    for layer, op in deltas.items():
        if isinstance(op, Intervention) and op.width != identity.hidden_size:
            raise BadArgumentError(f"deltas[{layer}] is an Intervention for width {op.width}, not "
                                   f"{identity.hidden_size}; build it from this model's vectors.")
    return dict(zip(layers, deltas.values()))


def apply(hidden: torch.Tensor, op: LayerOp) -> torch.Tensor:
    """``hidden`` ``[..., hidden]`` with ``op`` applied to every row (a new tensor)."""
    if isinstance(op, torch.Tensor):
        return hidden + op
    x = hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden
    if op.ablate is not None:  # one direction (the usual case) in matrix form: half the kernels
        pairs = zip(op.ablate[:, None], op.targets[:, None]) if len(op.ablate) > 1 else ((op.ablate, op.targets),)
        for u, t in pairs:  # u [1, hidden]
            x = x - (x @ u.T - t) @ u
    if op.clamp is not None:
        rows = zip(op.clamp[:, None], op.low[:, None], op.high[:, None]) if len(op.clamp) > 1 \
            else ((op.clamp, op.low, op.high),)
        for u, lo, hi in rows:
            p = x @ u.T
            x = x + (torch.clamp(p, lo, hi) - p) @ u
    if x.dtype != hidden.dtype:
        x = x.to(hidden.dtype)
    return x + op.add if op.add is not None else x


def combine(a: LayerOp, b: LayerOp) -> LayerOp:
    """Both ``a`` and ``b`` at one layer: the additions summed, ``a``'s ablations and
    clamps before ``b``'s."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a + b
    a, b = as_intervention(a), as_intervention(b)
    add = a.add if b.add is None else b.add if a.add is None else a.add + b.add

    def cat(x, y):
        return x if y is None else y if x is None else torch.cat([x, y])
    return Intervention(add, cat(a.ablate, b.ablate), cat(a.targets, b.targets),
                        cat(a.clamp, b.clamp), cat(a.low, b.low), cat(a.high, b.high))


def as_intervention(op: LayerOp) -> Intervention:
    return op if isinstance(op, Intervention) else Intervention(add=op)


def additions(ops: Mapping[int, LayerOp]) -> dict[int, torch.Tensor]:
    """The added tensor of each layer that adds one (what the steering bound checks)."""
    out = {}
    for layer, op in ops.items():
        add = op if isinstance(op, torch.Tensor) else op.add
        if add is not None:
            out[layer] = add
    return out


def shape_of(op: LayerOp) -> tuple:
    """What a captured graph depends on: ``("add",)`` for a tensor, else which parts an
    Intervention has and how many directions (values may change between replays)."""
    if isinstance(op, torch.Tensor):
        return ("add",)
    return (op.add is not None, 0 if op.ablate is None else len(op.ablate),
            0 if op.clamp is None else len(op.clamp))


def written(op: LayerOp) -> tuple:
    """The in-place write counters of ``op``'s tensors: the same object with the same
    counters holds the same values. Writes that bypass the counter (through ``.data``, a
    numpy or DLPack view) are not seen. Inference tensors keep no counter: their key is a
    new object each time, never equal to another."""
    try:
        return (op._version,) if isinstance(op, torch.Tensor) else tuple(t._version for t in op.parts)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return (object(),)


def copy_into(static: LayerOp, op: LayerOp) -> None:
    """Write ``op``'s values into ``static`` (of the same ``shape_of``) in place: the
    buffers a captured CUDA graph reads."""
    if isinstance(static, torch.Tensor):
        static.copy_(op)
        return
    for name in ("add", "ablate", "targets", "clamp", "low", "high"):
        target = getattr(static, name)
        if target is not None:
            target.copy_(getattr(op, name))


def labels(ops: Mapping[int, LayerOp] | None) -> dict[int, str]:
    """layer -> what runs there (``"add"``, ``"ablate1+add"``, ...), for the trace."""
    if not ops:
        return {}
    return {layer: "add" if isinstance(op, torch.Tensor) else op.label for layer, op in sorted(ops.items())}
