"""The trace summary sent with every response (extension field ``max_jupyter``): what
steering did during the generation, small enough for every reply."""
from __future__ import annotations

import math
from typing import Any

import torch

from max_jupyter.orchestrator.trace import GenerationResult


def trace_summary(result: GenerationResult) -> dict[str, Any]:
    """``steps``; ``steered_steps`` (the step's final forward added a non-zero delta: live
    mix, the request's steering or a judge's mix); ``reruns`` and ``changed_tokens``
    (post-step judges' re-runs, and those that changed the token); ``mixes``: name of a
    judge-gated mix -> steps it was on; ``judges``: judge name -> steps scored and their
    mean and max score; ``mix_changes``: the live mix's coefficients at step 0 and at every
    step where they changed; ``drafted`` / ``accepted``: tokens the small model drafted
    and the big model took (speculative decoding), ``acceptance_rate`` their ratio (None
    when nothing was drafted), ``speculate_off``: why speculation asked for did not run
    (else None); ``finish_reason``: the engine's own."""
    steps = result.steps
    mixes: dict[str, int] = {}
    for record in steps:
        for name in record.mixes_on:
            mixes[name] = mixes.get(name, 0) + 1
    return {"steps": len(steps),
            "steered_steps": _steered_steps(result),
            "reruns": sum(1 for r in steps if r.rerun),
            "changed_tokens": sum(1 for r in steps if r.changed),
            "mixes": mixes,
            "judges": _judge_scores(result),
            "mix_changes": _mix_changes(result),
            "drafted": result.drafted_tokens,
            "accepted": result.accepted_tokens,
            "acceptance_rate": result.acceptance_rate,
            "speculate_off": result.speculate_off,
            "finish_reason": result.finish_reason}


def _steered_steps(result: GenerationResult) -> int:
    if not result.deltas:
        return 0
    norms = torch.stack([d.float().abs().sum(-1) for d in result.deltas.values()])  # [layers, steps]
    return int((norms.sum(0) > 0).sum())


def _judge_scores(result: GenerationResult) -> dict[str, dict[str, float | int]]:
    out = {}
    for name, scores in result.scores.items():
        seen = [float(s) for s in scores if not math.isnan(s)]
        out[name] = {"steps": len(seen), "mean": sum(seen) / len(seen) if seen else None,
                     "max": max(seen) if seen else None}
    return out


def _mix_changes(result: GenerationResult) -> list[dict[str, Any]]:
    changes, last = [], None
    for record in result.steps:
        if record.live_coefs != last:
            changes.append({"step": record.step, "mix": dict(record.live_coefs)})
            last = record.live_coefs
    return changes
