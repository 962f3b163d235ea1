"""The logit lens: captured residuals of the big model read through its final norm and
unembedding (``Engine.unembed``, on every backend), as if each layer were the last."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from max_jupyter.engines.base import Engine
from max_jupyter.errors import BadArgumentError
from max_jupyter.orchestrator.trace import GenerationResult
from max_jupyter.validation import check_int


@dataclass(frozen=True)
class LogitLens:
    """``ids`` / ``probs``: ``[layers, steps, k]`` — the top-``k`` tokens (best first) and
    their probabilities at each of ``layers`` (rows in that order) and step; CPU tensors.
    ``token_ids``: the token each step wrote (what the model chose after its last layer)."""

    layers: tuple[int, ...]
    ids: torch.Tensor
    probs: torch.Tensor
    token_ids: tuple[int, ...]

    @property
    def steps(self) -> int:
        return self.ids.shape[1]


def lens_on_engine(engine: Engine, result: GenerationResult, layers: Sequence[int] | None = None,
                   k: int = 5) -> LogitLens:
    """Run the lens on ``engine`` (the model that produced ``result``); call it where the
    engine may be used (the Session's worker: ``logit_lens`` does that)."""
    if not result.steps:
        raise BadArgumentError("logit lens: this result has no steps; generate at least one token.")
    layers = sorted(result.big_hidden) if layers is None else list(layers)
    missing = [l for l in layers if l not in result.big_hidden]
    if not layers or missing:
        raise BadArgumentError(f"logit lens: layer(s) {missing or 'none'} not captured in this result "
                               f"(it has {sorted(result.big_hidden)}); generate with --capture "
                               f"or TraceConfig(big_layers=...).")
    k = check_int("k", k, low=1, high=engine.identity.vocab_size,
                  fix=f"ask for 1..{engine.identity.vocab_size} top tokens (e.g. k=5)")
    ids, probs = [], []
    for layer in layers:
        p = torch.softmax(engine.unembed(result.big_hidden[layer]), -1)  # [steps, vocab]
        top = torch.topk(p, k)
        ids.append(top.indices.cpu())
        probs.append(top.values.cpu())
    return LogitLens(tuple(layers), torch.stack(ids), torch.stack(probs),
                     tuple(r.token for r in result.steps))


def logit_lens(session, result: GenerationResult | None = None, layers: Sequence[int] | None = None,
               k: int = 5) -> LogitLens:
    """The logit lens of ``result`` (default: ``session.last``) through ``session.big``,
    computed on the Session's worker. ``session`` may also be an ``Engine`` (used directly)."""
    if isinstance(session, Engine):
        return lens_on_engine(session, result, layers, k)
    result = result if result is not None else session.last
    if result is None:
        raise BadArgumentError("logit lens: no result given and the session has not generated yet.")
    return session.run(lambda s: lens_on_engine(s.big, result, layers, k))
