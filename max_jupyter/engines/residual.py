"""The typical size of a model's residual stream per layer, and the bound on what steering
may add to it.

``measure`` runs one forward over ``NEUTRAL_TEXT`` on an empty cache and takes, per
layer, the median L2 norm of the residual over its positions (the first position left
out: many models park a norm tens of times larger there, an attention sink). The result is
kept per ``ModelIdentity`` (``known``), so every engine, vector and mix of one model reads
the same numbers; a coefficient is a multiple of them (``SteeringVector.deltas``).

``check_delta_norms`` refuses deltas whose norm at a layer exceeds ``MAX_DELTA_RATIO``
times that layer's typical norm, or is not finite (docs/errors.md says why this bound).
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from max_jupyter.engines.intervention import LayerOp, written
from max_jupyter.errors import BadArgumentError

if TYPE_CHECKING:
    from max_jupyter.engines.base import Engine, ModelIdentity

NEUTRAL_TEXT = ("The library opens at nine in the morning and closes at six in the evening. "
                "Visitors may borrow up to five books for three weeks, and the reading room "
                "on the second floor is quiet.")
"""Plain, unremarkable prose: what ``measure`` feeds (encoded as text, no chat template)."""
MAX_DELTA_RATIO = 16.0
"""Largest ``|delta| / typical residual norm`` accepted at a layer. At this ratio the
steered residual already points along the delta to within 0.2% (cosine 0.998): more adds
no steering, only the risk of overflow (fp16) and an output that no longer depends on the
text; the coefficients people use (up to about 2: docs/vectors.md) stay far below."""

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_known: dict[ModelIdentity, dict[int, float]] = {}
_lock = threading.Lock()


def known(identity: ModelIdentity) -> dict[int, float] | None:
    """The typical residual norm per layer of ``identity``, if an engine measured it."""
    with _lock:
        return _known.get(identity)


def measure(engine: Engine) -> dict[int, float]:
    """Measure ``engine``'s typical residual norms (once per model: later calls return the
    kept numbers). Runs one forward on the engine's *empty* cache and empties it again; the
    caller makes sure the cache may be emptied."""
    norms = known(engine.identity)
    if norms is not None:
        return norms
    ids = engine.tokenizer.encode(NEUTRAL_TEXT)[: max(2, engine.max_seq_len)]
    layers = frozenset(range(engine.identity.num_layers))
    engine.reset()
    try:
        hidden = engine._run(ids, {}, layers).hidden
    finally:
        engine.reset()
    norms = {layer: float(h.float()[1:].norm(dim=-1).median()) for layer, h in sorted(hidden.items())}
    with _lock:
        return _known.setdefault(engine.identity, norms)


def delta_sizes(deltas: Mapping[int, torch.Tensor]) -> dict[int, float]:
    """The L2 norm per layer, in float64 on the CPU (float32 squares overflow from about
    1e19 per element, which would call a finite delta infinite)."""
    if not deltas:
        return {}
    sizes = torch.stack([d.detach().to("cpu", torch.float64).norm() for d in deltas.values()])
    return dict(zip(deltas, sizes.tolist()))


def deltas_key(deltas: Mapping[int, LayerOp]) -> tuple:
    """What ``same_deltas`` compares: each layer, its op (a tensor or an ``Intervention``,
    kept alive) and its tensors' in-place write counters."""
    return tuple((layer, d, written(d)) for layer, d in deltas.items())


def same_deltas(deltas: Mapping[int, LayerOp], key: tuple | None) -> bool:
    """``deltas`` are the very ops of ``key``, unwritten since (so a check made on them
    holds): the steering loop passes one mix's deltas at every step until it changes."""
    return key is not None and len(key) == len(deltas) and all(
        layer == k and d is t and written(d) == v for (layer, d), (k, t, v) in zip(deltas.items(), key))


def check_finite_norms(deltas: Mapping[int, torch.Tensor], what: str) -> dict[int, float]:
    """Refuse ``deltas`` (``what`` names them) whose norm at a layer is not finite in
    float32; returns the norms."""
    sizes = delta_sizes(deltas)
    for layer, size in sizes.items():
        if not size <= FLOAT32_MAX:
            raise BadArgumentError(f"{what} at layer {layer} has a norm of {size:.3g}, which is "
                                   f"not finite in float32; rebuild it from values of a usual size.")
    return sizes


def check_delta_norms(identity: ModelIdentity, deltas: Mapping[int, torch.Tensor], what: str) -> None:
    """Refuse ``deltas`` (``what`` names them: ``"deltas"``, ``"the mix"``) whose norm
    at a layer is not finite in float32, or above ``MAX_DELTA_RATIO`` times the layer's
    typical residual norm where ``identity``'s norms are known (else only finiteness)."""
    sizes = check_finite_norms(deltas, what)
    norms = known(identity)
    for layer, size in sizes.items():
        ratio = size / norms[layer] if norms is not None else 0.0
        if ratio > MAX_DELTA_RATIO:
            raise BadArgumentError(
                f"{what} at layer {layer} has a norm of {size:.3g}, {ratio:.3g} times the "
                f"layer's typical residual norm {norms[layer]:.3g} (the bound is "
                f"{MAX_DELTA_RATIO:g}); lower the coefficient.")
