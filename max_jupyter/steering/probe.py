"""``ConceptProbe``: a linear probe that reads how much of a concept a text holds, from a
model's residual stream, as a calibrated probability.

Features: the residual at ``layer`` averaged over a text's tokens, read as the answer to a
neutral chat prompt (``CONTEXT``: the condition a generated answer is read in), centred
and scaled (``SCALE_SHRINK``). The probe is an L2-regularised logistic regression fitted
on the concept's labelled scoring texts (``steering.concepts``); its held-out AUROC comes from
``FOLDS``-fold cross-validation over those texts before the final fit on all of them. A
probe reads the model it was fitted on (the small model where one is loaded, so the model
that wrote a text is not the one that judges it, as a judge reads).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from max_jupyter.engines.base import Engine, ModelIdentity
from max_jupyter.steering.reading import read_rows
from max_jupyter.validation import check_str_list, fail

PROBE_DEPTH = 0.5
"""The layer a probe reads, as a fraction of the model's depth (the middle: concepts of
tone, register and language are linearly readable there)."""
CONTEXT = "Say something."
"""The user turn a scoring text is read after, as an answer (through the chat template)."""
FOLDS = 4
L2 = 1e-2  # ridge on the scaled weights: 576 features from ~28 texts need it
SCALE_SHRINK = 0.5
"""How far each feature's scale is pulled from its own spread over the scoring texts towards
the features' mean spread: ``sqrt((1 - s) var_j + s mean(var))``. Scaling each feature by
its own spread (s = 0) blows up the features that barely vary among ~28 short texts; a
generated answer (code, lists, a chat opening) moves them far, and the probe's reading
follows them: the 0.5B's french probe read the 1.5B's English answers as P(french) 0.54
on average at s = 0, 0.04 at 0.5. The held-out AUROCs moved by 0.02 at most, honest's
more (0.79 to 0.76 on the 0.5B, 0.72 to 0.66 on the embedded model; docs/evaluation.md)."""


@dataclass(frozen=True)
class ConceptProbe:
    """A fitted probe for ``concept`` on ``model`` at ``layer``: ``probability(features)``
    is P(concept) per row; ``auroc`` is the held-out AUROC of its cross-validation."""

    concept: str
    model: ModelIdentity
    layer: int
    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: float
    auroc: float

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """``[n]`` P(concept) for mean-pooled residuals ``features`` ``[n, hidden]``."""
        return torch.sigmoid(((features.float() - self.mean) / self.scale) @ self.weight + self.bias)

    def running(self, states: torch.Tensor) -> torch.Tensor:
        """``[n]`` P(concept) of an answer so far after each of its tokens, from its states
        at ``layer`` ``[n, hidden]`` (a running mean: the last is the whole answer's)."""
        running = states.float().cumsum(0) / torch.arange(1, len(states) + 1).unsqueeze(1)
        return self.probability(running)

    def read(self, engine: Engine, prompt_ids: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids)]``: ``running`` of the answer ``ids`` read after ``prompt_ids``."""
        self._check(engine)
        states = read_rows(engine, [[*prompt_ids, *ids]], [self.layer])[0][self.layer]
        return self.running(states[len(prompt_ids):])

    def score_texts(self, engine: Engine, texts: Sequence[str]) -> torch.Tensor:
        """``[n]`` P(concept) of each whole text, read as the answer to ``CONTEXT``."""
        self._check(engine)
        return self.probability(text_features(engine, texts, self.layer))

    def _check(self, engine: Engine) -> None:
        if engine.identity != self.model:
            raise fail("engine", engine.identity.describe(), f"is not the model probe {self.concept!r} "
                       f"was fitted on ({self.model.describe()})", "read with that model")

    def __repr__(self) -> str:
        return (f"ConceptProbe({self.concept!r}, layer {self.layer} of {self.model.describe()}, "
                f"held-out AUROC {self.auroc:.2f})")


def probe_layer(num_layers: int) -> int:
    return min(num_layers - 1, round(PROBE_DEPTH * num_layers))


def text_features(engine: Engine, texts: Sequence[str], layer: int) -> torch.Tensor:
    """``[len(texts), hidden]``: each text's residual at ``layer`` averaged over its tokens,
    read as the answer to ``CONTEXT``. Side effect: empties the engine's caches."""
    context = engine.tokenizer.chat(CONTEXT)
    rows = [context + engine.tokenizer.encode(text) for text in texts]
    return torch.stack([states[layer][len(context):].mean(0) for states in read_rows(engine, rows, [layer])])


def fit_probe(engine: Engine, concept: str, positive: Sequence[str], negative: Sequence[str],
              layer: int | None = None) -> ConceptProbe:
    """Fit a probe for ``concept`` on ``engine``'s model from labelled texts (cross-validated
    first for its held-out AUROC). Side effect: resets the engine's cache."""
    positive = check_str_list("positive", positive, allow_empty_list=False)
    negative = check_str_list("negative", negative, allow_empty_list=False)
    if min(len(positive), len(negative)) < FOLDS:
        raise fail("positive", f"<{len(positive)} and {len(negative)} texts>", f"is too few for "
                   f"{FOLDS}-fold cross-validation", f"give at least {FOLDS} texts of each label")
    layer = probe_layer(engine.identity.num_layers) if layer is None else layer
    x = text_features(engine, [*positive, *negative], layer)
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])
    held_out = torch.empty(len(y))
    for fold in range(FOLDS):
        test = torch.arange(len(y)) % FOLDS == fold  # each label spread over the folds
        mean, scale, weight, bias = _logistic(x[~test], y[~test])
        held_out[test] = ((x[test] - mean) / scale) @ weight + bias
    mean, scale, weight, bias = _logistic(x, y)
    return ConceptProbe(concept, engine.identity, layer, mean, scale, weight, bias, auroc(held_out, y))


def _logistic(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Centre and scale ``x`` (``SCALE_SHRINK``) and fit an L2-regularised logistic
    regression (L-BFGS, float64)."""
    var = x.var(0)
    mean, scale = x.mean(0), ((1 - SCALE_SHRINK) * var + SCALE_SHRINK * var.mean()).sqrt().clamp_min(1e-6)
    z = ((x - mean) / scale).double()
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.double()) \
            + L2 * (w @ w) / 2
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    return mean, scale, w.detach().float(), float(b.detach())


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counted half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos.unsqueeze(1) - neg.unsqueeze(0)
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())
