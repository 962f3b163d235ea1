"""Steering vectors from contrastive pairs, read on a live engine.

Each example is run alone through the engine (batch 1, so any backend works) and its
residual at the last token is read at every requested layer. Per pair, ``diff = pos - neg``.

- ``mean_diff``: the mean of the diffs.
- ``pca_diff``: the first principal direction of the diffs (repeng's ``pca_diff``), taken
  uncentred — the same as centred PCA over the diffs with each pair's order randomised —
  and scaled to the mean projection of the diffs on it, so coefficient 1 is one typical
  pair difference, as for ``mean_diff``.

Either way the sign is fixed so that adding the vector moves the projection toward the
positive examples.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch

from max_jupyter.engines.base import Engine, check_layers
from max_jupyter.steering.vector import SteeringVector

Method = Literal["pca_diff", "mean_diff"]


def read_last_token_states(engine: Engine, texts: Sequence[str], layers: Sequence[int],
                           encode: Callable[[str], list[int]] | None = None,
                           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``[len(texts), len(layers), hidden]`` float32 CPU: residuals at each text's last token.

    Side effect: resets the engine's cache. ``encode`` defaults to the tokenizer with
    special tokens; ``progress(done, total)`` is called after each text.
    """
    encode = encode or (lambda t: engine.tokenizer.encode(t, add_special_tokens=True))
    rows = []
    for n, text in enumerate(texts):
        hidden = engine.prefill(encode(text), capture=layers).hidden
        rows.append(torch.stack([hidden[l][-1].float().cpu() for l in layers]))
        if progress:
            progress(n + 1, len(texts))
    engine.reset()
    return torch.stack(rows)


def train_vector(engine: Engine, positive: Sequence[str], negative: Sequence[str],
                 layers: Iterable[int] | None = None, method: Method = "pca_diff",
                 label: str = "", encode: Callable[[str], list[int]] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> SteeringVector:
    """Train a vector for ``engine``'s model from pairs ``(positive[k], negative[k])``.

    ``layers`` defaults to every layer. Checks the inputs before any forward pass; resets
    the engine's cache.
    """
    if not positive or not negative:
        raise ValueError("train_vector needs at least one positive and one negative example.")
    if len(positive) != len(negative):
        raise ValueError(f"train_vector needs pairs: got {len(positive)} positive and "
                         f"{len(negative)} negative examples; give the same number of each.")
    if method not in ("pca_diff", "mean_diff"):
        raise ValueError(f"unknown method {method!r}; use 'pca_diff' or 'mean_diff'.")
    layers = list(range(engine.identity.num_layers)) if layers is None else sorted(set(layers))
    check_layers(engine.identity, layers, "train_vector")
    states = read_last_token_states(engine, [*positive, *negative], layers, encode, progress)
    pos, neg = states[: len(positive)], states[len(positive):]  # [pairs, layers, hidden]
    diffs = pos - neg
    directions = {}
    for j, layer in enumerate(layers):
        d = diffs[:, j]  # [pairs, hidden]
        if method == "mean_diff":
            direction = d.mean(0)
        else:
            unit = torch.linalg.svd(d, full_matrices=False).Vh[0]  # [hidden]
            direction = unit * (d @ unit).mean()  # sign and scale from the mean projection
        directions[layer] = direction
    return SteeringVector(directions, engine.identity, label or method)
