"""Steering vectors from contrastive pairs, read on a live engine.

Each example is run alone through the engine (batch 1, so any backend works) and its
residual is read at every requested layer, at its last token (or, with ``read="reply"``,
as a chat reply, below). Per pair, ``diff = pos - neg``.

Methods (``method=``), each named for what it computes (the values per layer; a
coefficient means the same push for any of them: ``SteeringVector.deltas``):

- ``mean_diff``: the mean of the diffs.
- ``svd_diff`` (the default; formerly called ``pca_diff``, which still selects it with a
  ``DeprecationWarning``): the first right-singular vector of the uncentred diffs — the
  same as centred PCA over the diffs with each pair's order randomised — scaled to the mean
  projection of the diffs on it (one typical pair difference, as ``mean_diff``); its sign
  makes that mean projection positive.
- ``pca_diff_unit``: repeng's ``ControlVector.train`` (its ``pca_diff``): the first
  principal component of the *centred* diffs, unit norm, sign as repeng fixes it (sklearn's
  convention, then flipped if more pairs project lower on the positive text than on the
  negative). Its values equal repeng's, so they export to repeng and llama.cpp unchanged.

Where the states are read (``read=``):

- ``last_token`` (the default): each text alone, at its last token.
- ``reply``: each text as the reply to a neutral chat prompt, averaged over its tokens
  (``read_reply_states``), the way probes and judges read generated text. Each layer's
  direction comes from these states; its length is the ``last_token`` method's at that
  layer, so the layers share a coefficient's push as they do under ``last_token``. Reads
  every text twice (``encode`` applies to the last-token pass only). The concept library
  trains this way (``steering.concepts.CONCEPT_READ``).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, get_args

import torch

from max_jupyter.engines.base import Engine
from max_jupyter.steering.vector import SteeringVector
from max_jupyter.validation import check_layers, check_str_list, fail

Method = Literal["svd_diff", "pca_diff_unit", "mean_diff", "pca_diff"]
Read = Literal["last_token", "reply"]
READS = get_args(Read)


def mean_diff(diffs: torch.Tensor) -> torch.Tensor:
    """The mean of the pair differences ``diffs`` ``[pairs, hidden]``."""
    return diffs.mean(0)


def svd_diff(diffs: torch.Tensor) -> torch.Tensor:
    """First right-singular vector of the uncentred ``diffs``, times the mean projection of
    ``diffs`` on it (which also fixes the sign)."""
    unit = torch.linalg.svd(diffs, full_matrices=False).Vh[0]
    return unit * (diffs @ unit).mean()


def pca_diff_unit(diffs: torch.Tensor) -> torch.Tensor:
    """repeng's ``pca_diff``: the unit first principal component of the centred ``diffs``
    (computed in float64), its largest-magnitude entry made positive (sklearn's sign), then
    negated if more pairs have ``diff @ direction < 0`` than ``> 0`` (repeng's vote)."""
    x = diffs.double()
    unit = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[0]
    unit = unit * torch.sign(unit[unit.abs().argmax()])
    proj = x @ unit
    if (proj < 0).sum() > (proj > 0).sum():
        unit = -unit
    return unit.float()


METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "svd_diff": svd_diff, "pca_diff_unit": pca_diff_unit, "mean_diff": mean_diff}
"""Training methods by name: each maps the pair differences ``[pairs, hidden]`` at one
layer to that layer's direction ``[hidden]``."""
RENAMED = {"pca_diff": "svd_diff"}
"""Old method names that still work (with a ``DeprecationWarning``)."""


def resolve_method(method: str) -> str:
    """The current name of ``method``: an old name warns and maps to its new one; an unknown
    one raises ``BadArgumentError``."""
    if isinstance(method, str) and method in RENAMED:
        new = RENAMED[method]
        warnings.warn(f"method={method!r} is now called {new!r} (uncentred SVD of the pair "
                      f"differences, scaled); for repeng's pca_diff (unit norm, centred PCA) use "
                      f"'pca_diff_unit'.", DeprecationWarning, stacklevel=3)
        return new
    if not isinstance(method, str) or method not in METHODS:
        raise fail("method", method, "is unknown", f"use one of {sorted(METHODS)}")
    return method


def read_last_token_states(engine: Engine, texts: Sequence[str], layers: Sequence[int],
                           encode: Callable[[str], list[int]] | None = None,
                           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``[len(texts), len(layers), hidden]`` float32 CPU: residuals at each text's last token.

    Side effect: resets the engine's cache. ``encode`` defaults to the tokenizer with
    special tokens; ``progress(done, total)`` is called after each text.
    """
    encode = encode or (lambda t: engine.tokenizer.encode(t, add_special_tokens=True))
    rows = []
    try:
        for n, text in enumerate(texts):
            hidden = engine.prefill(encode(text), capture=layers).hidden
            rows.append(torch.stack([hidden[l][-1].float().cpu() for l in layers]))
            if progress:
                progress(n + 1, len(texts))
    finally:  # also after Ctrl-C from ``progress``
        engine.reset()
    return torch.stack(rows)


def read_reply_states(engine: Engine, texts: Sequence[str], layers: Sequence[int],
                      prompt: str = "Write one sentence.",
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``[len(texts), len(layers), hidden]`` float32 CPU: per text, with it as the reply to
    the chat ``prompt``, the mean of the residual over the text's tokens. This is where a
    probe judge reads generated text (a bare sentence read at its last token sits far
    from it), so a probe's threshold is calibrated on these. Side effect: resets the
    engine's cache; ``progress(done, total)`` is called after each text."""
    head = engine.tokenizer.chat(prompt)
    rows = []
    try:
        for n, text in enumerate(texts):
            hidden = engine.prefill(head + engine.tokenizer.encode(text), capture=layers).hidden
            rows.append(torch.stack([hidden[l][len(head):].float().mean(0).cpu() for l in layers]))
            if progress:
                progress(n + 1, len(texts))
    finally:  # also after Ctrl-C from ``progress``
        engine.reset()
    return torch.stack(rows)


def train_vector(engine: Engine, positive: Sequence[str], negative: Sequence[str],
                 layers: Iterable[int] | None = None, method: Method = "svd_diff",
                 read: Read = "last_token", label: str = "",
                 encode: Callable[[str], list[int]] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> SteeringVector:
    """Train a vector for ``engine``'s model from pairs ``(positive[k], negative[k])``.

    ``layers`` defaults to every layer; ``read``: where the states are read (the module's
    docstring). Checks the inputs before any forward pass (``BadArgumentError``; see
    ``check_pairs``); resets the engine's cache. ``progress(done, total)`` counts texts read
    (each text twice with ``read="reply"``).
    """
    check_pairs(positive, negative)
    method = resolve_method(method)
    check_read(read)
    if method == "pca_diff_unit" and len(positive) < 2:
        raise fail("positive", list(positive), "holds one pair, and PCA of one centred "
                   "difference is undefined", "give at least two pairs, or use method='mean_diff'")
    layers = (list(range(engine.identity.num_layers)) if layers is None
              else sorted(set(check_layers(engine.identity, layers, "layers"))))
    if not layers:
        raise fail("layers", [], "is empty", "give at least one layer, or None for every layer")
    texts = [*positive, *negative]
    total = len(texts) * (2 if read == "reply" else 1)

    def counted(before: int) -> Callable[[int, int], None] | None:  # one count over both passes
        return None if progress is None else (lambda n, _total: progress(before + n, total))

    diffs = pair_diffs(read_last_token_states(engine, texts, layers, encode, counted(0)))
    directions = {layer: METHODS[method](diffs[:, j]) for j, layer in enumerate(layers)}
    if read == "reply":  # the reply's direction, at the last token's length
        replies = pair_diffs(read_reply_states(engine, texts, layers, progress=counted(len(texts))))
        for j, layer in enumerate(layers):
            along = METHODS[method](replies[:, j])
            size = along.norm()
            directions[layer] = along / size * directions[layer].norm() if size > 0 else along
    return SteeringVector(directions, engine.identity, label or stored_method(method, read))


def pair_diffs(states: torch.Tensor) -> torch.Tensor:
    """``positive - negative`` per pair, from the states of ``[*positive, *negative]``:
    ``[pairs, layers, hidden]``."""
    half = len(states) // 2
    return states[:half] - states[half:]


def stored_method(method: str, read: str) -> str:
    """How a vector was trained, as a VectorStore keeps it: ``method``, with ``read``
    after it where it is not the default (``"svd_diff, read=reply"``)."""
    return method if read == "last_token" else f"{method}, read={read}"


def check_read(read: object) -> None:
    """``read`` is one of ``READS``; else ``BadArgumentError``."""
    if read not in READS:
        raise fail("read", read, "is unknown", f"use one of {list(READS)}")


def check_pairs(positive: Sequence[str], negative: Sequence[str]) -> None:
    """Examples are lists of non-empty str of equal length. Pairs whose two texts are the
    same add nothing: all of them -> ``BadArgumentError`` (the vector would be all zeros),
    some -> a ``UserWarning`` naming them."""
    positive = check_str_list("positive", positive, allow_empty_list=False)
    negative = check_str_list("negative", negative, allow_empty_list=False)
    if len(positive) != len(negative):
        raise fail("negative", f"<{len(negative)} examples>", f"does not pair with {len(positive)} "
                   f"positive examples", "give the same number of each (pairs positive[k], negative[k])")
    same = [k for k, (p, n) in enumerate(zip(positive, negative)) if p == n]
    if len(same) == len(positive):
        raise fail("negative", list(negative), "equals positive in every pair, so the vector would "
                   "be all zeros", "give contrasting texts (positive[k] differs from negative[k])")
    if same:
        warnings.warn(f"train_vector: pairs {same} have the same positive and negative text and "
                      f"add nothing to the vector; replace them with contrasting texts.", stacklevel=3)
