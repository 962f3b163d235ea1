"""Reading whole token rows unsteered: each row's residual states at chosen layers and,
from the last layer's states, the log-likelihood of its tokens. Rows go through the
engine's batch prefill (``BatchEngine``) where it has one, ``READ_ROWS`` at a time, else
one ``prefill`` each; the caches they used are emptied after. What the probes and the
evaluation's scores read texts with."""
from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from max_jupyter.engines.base import Engine

READ_ROWS = 16
"""Rows per batch prefill: bounds the batch's memory and how long Ctrl-C waits."""


def read_rows(engine: Engine, rows: Sequence[Sequence[int]], layers: Collection[int]
              ) -> list[dict[int, torch.Tensor]]:
    """Per row, ``{layer: [len(row), hidden]}`` float32 CPU states at ``layers``, unsteered.
    Side effect: empties the engine's (batch) cache."""
    layers = sorted(set(layers))
    out: list[dict[int, torch.Tensor]] = []
    if engine.supports_batch:
        try:
            for start in range(0, len(rows), READ_ROWS):
                chunk = [list(r) for r in rows[start:start + READ_ROWS]]
                results = engine.prefill_batch(chunk, capture=layers)
                out += [{l: results[i].hidden[l].float().cpu() for l in layers} for i in range(len(chunk))]
        finally:
            engine.reset_batch()
        return out
    try:
        for row in rows:
            hidden = engine.prefill(list(row), capture=layers).hidden
            out.append({l: hidden[l].float().cpu() for l in layers})
            engine.reset()
    finally:
        engine.reset()
    return out


def token_nll(engine: Engine, last_states: torch.Tensor, ids: Sequence[int], start: int) -> torch.Tensor:
    """``[len(ids) - start]`` negative log-likelihood of each of ``ids[start:]`` given the ids
    before it, from the row's last-layer states ``last_states`` ``[len(ids), hidden]``
    (``unembed`` of them is the forward's logits); ``start`` >= 1."""
    logits = engine.unembed(last_states[start - 1:len(ids) - 1]).float()
    logp = torch.log_softmax(logits, -1)
    targets = torch.tensor(list(ids[start:]), device=logp.device)
    return -logp[torch.arange(len(targets)), targets].cpu()
