"""The logit lens: captured residuals of the big model read through its final norm and
unembedding, as if each layer were the last."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from max_jupyter.engines.base import Engine
from max_jupyter.errors import BadArgumentError
from max_jupyter.orchestrator.trace import GenerationResult


@dataclass(frozen=True)
class LogitLens:
    """``ids`` / ``probs``: ``[layers, steps, k]`` — the top-``k`` tokens (best first) and
    their probabilities at each of ``layers`` (rows in that order) and step; CPU tensors."""

    layers: tuple[int, ...]
    ids: torch.Tensor
    probs: torch.Tensor


def _head(engine: Engine):
    """The engine's final norm and unembedding modules (HF models only)."""
    model = getattr(engine, "model", None)
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is None or not hasattr(model, "get_output_embeddings"):
        raise BadArgumentError(f"the logit lens needs the transformers backend (its final norm and "
                               f"unembedding); this engine is {type(engine).__name__}.")
    return norm, model.get_output_embeddings()


def lens_on_engine(engine: Engine, result: GenerationResult, layers: Sequence[int] | None = None,
                   k: int = 5) -> LogitLens:
    """Run the lens on ``engine`` (the model that produced ``result``); call it where the
    engine may be used (the Session's worker: ``logit_lens`` does that)."""
    layers = sorted(result.big_hidden) if layers is None else list(layers)
    missing = [l for l in layers if l not in result.big_hidden]
    if not layers or missing:
        raise BadArgumentError(f"logit lens: layer(s) {missing or 'none'} not captured in this result "
                               f"(it has {sorted(result.big_hidden)}); generate with --capture "
                               f"or TraceConfig(big_layers=...).")
    norm, unembed = _head(engine)
    ids, probs = [], []
    with torch.inference_mode():
        for layer in layers:
            h = result.big_hidden[layer].to(engine.device, engine.dtype)  # [steps, hidden]
            p = torch.softmax(unembed(norm(h)).float(), -1)  # [steps, vocab]
            top = torch.topk(p, k)
            ids.append(top.indices.cpu())
            probs.append(top.values.cpu())
    return LogitLens(tuple(layers), torch.stack(ids), torch.stack(probs))


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
