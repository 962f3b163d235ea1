"""Batched generation: prompts, each with its own steering and options, advanced together
on a ``BatchEngine``, one token per live row a step.

Each row is a generation prepared by its own ``CognitiveOrchestrator`` (no small model, no
judges: its steering is the live mix and the row's own, resolved at every step as the
plain loop resolves it), so a row's sampler (and seed), stop strings, decoder, trace and
``GenerationResult`` are those of the same generation run alone; only the forwards are
shared. A row that takes EOS, meets a stop string or reaches its ``max_new_tokens`` leaves
the batch (``BatchEngine.drop_rows``) and the others go on. On an engine without
``supports_batch`` the rows run one after another through the plain loop.

``abort`` set (the Session sets it on Ctrl-C) or a ``KeyboardInterrupt`` ends the batch
before its next step: finished rows keep their results, the live ones end with
``finish_reason == "interrupted"`` and their partial text.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch

from max_jupyter.engines.base import BatchEngine, Engine, ForwardResult
from max_jupyter.orchestrator.cognitive import CognitiveOrchestrator, PreparedRun, _Forward, _Judged
from max_jupyter.orchestrator.judges import NO_MIXES
from max_jupyter.orchestrator.trace import GenerationResult
from max_jupyter.orchestrator.types import run_to_end

Row = tuple[CognitiveOrchestrator, PreparedRun]
"""One row: its orchestrator (built without a small model and judges) and prepared run."""


def generate_batch(engine: Engine, rows: Sequence[Row], abort: threading.Event,
                   on_tokens: Callable[[int], None] | None = None) -> list[GenerationResult]:
    """Run ``rows`` (prepared for ``engine``) to the end together; their results in order.
    ``on_tokens(n)`` hears of ``n`` more tokens done (a row ending early counts the ones it
    will not take, so the total is the sum of ``max_new_tokens``)."""
    count = on_tokens or (lambda n: None)
    start = time.perf_counter()
    for orchestrator, run in rows:
        run.abort, run.start = abort, start
        run.result.start_mix = dict(orchestrator.resolver.live_coefs())
    if not engine.supports_batch:
        return [_alone(orchestrator, run, count) for orchestrator, run in rows]
    live = dict(enumerate(rows))
    try:
        if abort.is_set():
            raise KeyboardInterrupt
        outs = _prefill(engine, live)
        for step in range(max(run.max_new_tokens for _, run in rows)):
            ended = _take_all(step, live, outs, count)
            for i in ended:
                _finish(*live.pop(i))
            if not live:
                break
            engine.drop_rows(ended)
            if abort.is_set():
                raise KeyboardInterrupt
            outs = _step(engine, live)
    except KeyboardInterrupt:
        for orchestrator, run in live.values():
            run.result.finish_reason = "interrupted"
            _finish(orchestrator, run)
    finally:
        engine.reset_batch()
    return [run.result for _, run in rows]


def _prefill(engine: BatchEngine, live: dict[int, Row]) -> dict[int, tuple]:
    """The batch's prefill (each row steered as its loop steers step 0); row -> (its
    output, deltas, live coefficients)."""
    steering = {i: o.resolver.resolve(NO_MIXES, 0) if run.steer_prompt else (None, {})
                for i, (o, run) in live.items()}
    capture = sorted({layer for _, run in live.values() for layer in run.capture})
    outs = engine.prefill_batch([run.result.prompt_ids for _, run in live.values()],
                                [steering[i][0] for i in live], capture,
                                reserve=[run.max_new_tokens for _, run in live.values()])
    return {i: (outs[i], *steering[i]) for i in live}


def _step(engine: BatchEngine, live: dict[int, Row]) -> dict[int, tuple]:
    """One token for every live row, each with its own steering as resolved now."""
    steering = {i: o.resolver.resolve(NO_MIXES, len(run.result.steps)) for i, (o, run) in live.items()}
    capture = sorted({layer for _, run in live.values() for layer in run.capture})
    outs = engine.step_batch({i: run.result.token_ids[-1] for i, (_, run) in live.items()},
                             {i: s[0] for i, s in steering.items()}, capture)
    return {i: (outs[i], *steering[i]) for i in live}


def _take_all(step: int, live: dict[int, Row], outs: dict[int, tuple], count: Callable[[int], None]
              ) -> set[int]:
    """Sample and record step ``step`` of every live row; the rows that end. Each row
    samples as its loop would (its own sampler; greedy: the argmax, which the batch takes
    for all rows at once, as it does their model probabilities and top-k: one pass and one
    wait for the device instead of several per row)."""
    rows = list(live)
    logits = torch.stack([outs[i][0].logits for i in rows])  # [n, vocab] float32
    sampled = {i: live[i][1].sampler.sample(outs[i][0].logits) for i in rows
               if live[i][1].sampler.config.temperature != 0}
    tokens = [sampled[i][0] if i in sampled else t for i, t in zip(rows, logits.argmax(-1).tolist())]
    chosen = torch.tensor(tokens, device=logits.device)
    model_probs = torch.exp(logits[torch.arange(len(rows), device=logits.device), chosen]
                            - torch.logsumexp(logits, -1)).tolist()
    k = min(max(live[i][1].recorder.config.top_k for i in rows), logits.shape[-1])
    values, ids = torch.topk(logits, k)
    ended = set()
    for j, i in enumerate(rows):
        orchestrator, run = live[i]
        top_k = min(run.recorder.config.top_k, k)
        prob = sampled[i][1] if i in sampled else 1.0
        if _take(step, orchestrator, run, outs[i], tokens[j], prob, model_probs[j],
                 (values[j, :top_k], ids[j, :top_k]), count):
            ended.add(i)
    return ended


def _take(step: int, orchestrator: CognitiveOrchestrator, run: PreparedRun,
          out: tuple[ForwardResult, object, dict], token: int, prob: float, model_prob: float,
          top: tuple[torch.Tensor, torch.Tensor], count: Callable[[int], None]) -> bool:
    """Record step ``step`` of one row, which took ``token`` (as the plain loop does);
    True where the row ends (its finish reason set)."""
    forward, deltas, coefs = out
    result = run.result
    result.steps.append(orchestrator._record(step, run, token, prob, _Judged(),
                                             _Forward(forward, deltas, NO_MIXES, coefs), ({}, None),
                                             model_prob=model_prob, top=top))
    if token in orchestrator.big.tokenizer.eos_ids and not run.ignore_eos:
        result.finish_reason = "eos"
    else:
        result.token_ids.append(token)
        result.text += run.stops.feed(run.decoder.feed(token))
        if run.stops.stopped:
            result.finish_reason = "stop"
        elif step + 1 == run.max_new_tokens:
            result.finish_reason = "length"
        else:
            count(1)
            return False
    count(run.max_new_tokens - step)
    return True


def _finish(orchestrator: CognitiveOrchestrator, run: PreparedRun) -> None:
    """A row's end, as the plain loop ends a generation: held-back text, the trace."""
    result = run.result
    result.text += run.stops.drain(run.decoder)
    result.incomplete = run.decoder.incomplete
    orchestrator._finish(run)


def _alone(orchestrator: CognitiveOrchestrator, run: PreparedRun, count: Callable[[int], None]
           ) -> GenerationResult:
    """One row through the plain loop (an engine without a batch): interrupted, without
    a step, once ``abort`` is set."""
    if run.abort.is_set():
        run.result.finish_reason = "interrupted"
        _finish(orchestrator, run)
    else:
        run_to_end(orchestrator.run(run))
        if run.result.finish_reason in ("aborted", "interrupted"):
            run.result.finish_reason = "interrupted"
            run.abort.set()  # a Ctrl-C inside the row ends the rows after it too
    count(run.max_new_tokens)
    return run.result
