"""Ablation means: the typical projection of a model's residual on a vector's direction,
per layer, what mean-ablation (``!name=mean``) sets the projection to instead of zero.

``measure_means`` runs one forward of ``engines.residual.NEUTRAL_TEXT`` (the text the
steering bound is measured on) on the engine's empty cache, capturing the vector's layers,
and takes the mean of ``h . u`` over the positions (the first left out: the attention
sink). Measured once per vector and model: kept here by (model, vector checksum), and
stored with the vector by the Session where its library is a ``VectorStore``.
"""
from __future__ import annotations

import threading

from max_jupyter.engines.base import Engine
from max_jupyter.engines.residual import NEUTRAL_TEXT
from max_jupyter.steering.vector import SteeringVector

_known: dict[tuple, dict[int, float]] = {}
_lock = threading.Lock()


def known_means(vector: SteeringVector) -> dict[int, float] | None:
    """The means of ``vector`` measured in this process, if any."""
    with _lock:
        return _known.get((vector.model, vector.checksum()))


def remember(vector: SteeringVector, means: dict[int, float]) -> dict[int, float]:
    """Keep ``means`` (e.g. read from a store) for ``vector``; returns them."""
    with _lock:
        return _known.setdefault((vector.model, vector.checksum()), dict(means))


def measure_means(engine: Engine, vector: SteeringVector) -> dict[int, float]:
    """layer -> the mean projection of ``engine``'s residual on ``vector``'s unit direction
    over neutral text (see the module). Empties the engine's cache: call it on the thread
    that owns the engine, between generations. Checks the vector is for ``engine``."""
    vector.check_model(engine.identity)
    got = known_means(vector)
    if got is not None:
        return got
    ids = engine.tokenizer.encode(NEUTRAL_TEXT)[: max(2, engine.max_seq_len)]
    try:
        hidden = engine.prefill(ids, capture=vector.layers).hidden
    finally:
        engine.reset()
    means = {}
    for layer, d in vector.directions.items():
        norm = float(d.norm())
        h = hidden[layer].float()[1:]  # [n - 1, hidden]
        means[layer] = float((h @ (d / norm).to(h.device)).mean()) if norm > 0 else 0.0
    return remember(vector, means)
