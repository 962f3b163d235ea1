"""``CognitiveOrchestrator``: the big model writes, the small model watches, judges steer.

Per step ``t`` (choosing generated token ``t``):

1. pre-step judges decide from the small model's state after it consumed token ``t - 1``
   (its forward already captured the layers they read: no extra forward);
2. the big model forwards token ``t - 1`` (step 0: prefills the prompt, steered only if
   ``steer_prompt``) with the summed deltas of the mixes the judges turned on;
3. post-step judges see that pass's logits; if they add a mix, the big model rewinds one
   position and re-runs the forward with the new deltas (step 0: prefills the prompt
   again, steered) — both versions are recorded;
4. token ``t`` is sampled; EOS, a stop string or ``max_new_tokens`` ends the generation;
5. the mirror feeds token ``t`` to the small model;
6. a ``StepEvent`` goes to the callback and out of the iterator.

Without a small model no mirroring happens; with no judges nothing is steered.

Overlap (``overlap``; by default on where the big engine ``launches_async`` and there are a
small model and pre-step judges): once token ``t`` is sampled and the generation goes on,
the big model's forward of step ``t + 1`` (feeding token ``t``) is issued *before* step 5,
speculatively, with the deltas that step ``t``'s pre-step judges chose, so the two models'
work overlaps on the device. Step ``t + 1`` keeps that forward if its judges choose the same
deltas (same mixes, no controller changed); otherwise the big model rewinds one position
and forwards again (``GenerationResult.speculation_misses`` counts these; they are not
re-runs). Tokens, records and trace are those of the order above; only the schedule differs.

Speculative decoding (not implemented) fits between 1 and 5 without a rewrite when steering
is off or the same mix holds for the whole draft: the small model drafts ``k`` tokens
(same vocabulary only; its forwards are the mirror's, and the pre-step judges run on each
draft position's captured state, so a judge that would change the mix ends the draft
there); the big model verifies them in one ``forward(draft, deltas)``; the accepted prefix
goes through steps 4-6 one token at a time, and both caches rewind the
rejected tail. The engine contract needs one addition for this: per-position logits
(``[n_fed, vocab]``) from ``forward``, which today returns the last position's only.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from max_jupyter.engines.base import Engine, ForwardResult, LayerDeltas, check_layers, check_room
from max_jupyter.orchestrator.judges import (NO_MIXES, Judge, JudgeContext, JudgeError, JudgeLike,
                                             as_judges, check_judges)
from max_jupyter.orchestrator.mirror import ContextMirror
from max_jupyter.orchestrator.mixes import Mixes
from max_jupyter.orchestrator.types import Prompt, Steering, prompt_ids, run_to_end
from max_jupyter.orchestrator.sampling import Sampler, SamplingConfig
from max_jupyter.orchestrator.stopping import StopStrings
from max_jupyter.orchestrator.trace import (GenerationResult, StepEvent, StepRecord, TraceConfig,
                                            TraceRecorder)


class CognitiveOrchestrator:
    """Generates with ``big``, mirrored by ``small`` (optional), steered by ``judges``.

    ``steering``: the mixes judges may turn on — a ``SteeringController`` or vector (named
    ``"default"``) or a mapping name -> controller/vector; all for the big model. A
    controller may be changed from another thread at any time: the change applies whole
    from the next step. Construction checks the models, judges and mixes fit together.
    ``overlap``: issue each big step ahead of the mirror's (see the module); ``None``: where
    it pays (``big.launches_async``, a small model and pre-step judges).
    """

    def __init__(self, big: Engine, small: Engine | None = None,
                 judges: JudgeLike | Sequence[JudgeLike] | None = None,
                 steering: Steering | Mapping[str, Steering] = None, mirror_window: int = 8,
                 overlap: bool | None = None):
        self.big, self.small = big, small
        self.mixes = Mixes(big, steering)
        self.mirror = ContextMirror(big, small, mirror_window) if small is not None else None
        self.judges = as_judges(judges)
        check_judges(self.judges, self.mixes, big.identity, small.identity if small else None,
                     self.mirror is not None and self.mirror.shares_vocab)
        self._pre = [j for j in self.judges if not j.post_step]
        self._post = [j for j in self.judges if j.post_step]
        self.overlap = (big.launches_async and small is not None and bool(self._pre)
                        if overlap is None else overlap)
        self._abort = threading.Event()

    def abort(self) -> None:
        """Ask the running generation to stop before its next step (``finish_reason ==
        "aborted"``); safe from any thread. Each generation starts un-aborted."""
        self._abort.set()

    def generate(self, prompt: Prompt, **options) -> GenerationResult:
        """Run ``stream`` to the end and return its result (see ``stream`` for options)."""
        return run_to_end(self.stream(prompt, **options))

    def stream(self, prompt: Prompt, *, max_new_tokens: int = 128,
               sampling: SamplingConfig = SamplingConfig(), stop: Sequence[str] = (),
               steer_prompt: bool = True, chat: bool = True, trace: TraceConfig = TraceConfig(),
               on_event: Callable[[StepEvent], None] | None = None, ignore_eos: bool = False,
               ) -> Iterator[StepEvent]:
        """Yield a ``StepEvent`` per step (also passed to ``on_event`` first); the return
        value (``StopIteration.value``) is the ``GenerationResult``. The options mean what
        they mean for the plain loop (``plain.stream``); ``ignore_eos`` keeps going past EOS
        tokens (for benchmarks of a fixed length).

        Ctrl-C (also inside a callback or judge) ends the generation with
        ``finish_reason == "interrupted"`` and the partial result; both caches stay
        consistent and the next generation starts from fresh prefills. A judge that raises
        stops the generation; ``JudgeError`` (naming the judge and step) is raised with
        the partial result in its ``result``.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
        big, small, mirror = self.big, self.small, self.mirror
        ids = prompt_ids(big, prompt, chat)
        check_room(big, len(ids) + max_new_tokens, from_empty=True)
        check_layers(big.identity, trace.big_layers, "trace big_layers")
        if trace.small_layers and small is None:
            raise ValueError("trace small_layers asks for small-model states, but there is no "
                             "small model.")
        small_capture = sorted({*trace.small_layers, *(l for j in self.judges for l in j.small_layers)})
        if small is not None:
            check_layers(small.identity, small_capture, "trace small_layers")
            if mirror.shares_vocab:
                check_room(small, len(ids) + max_new_tokens, from_empty=True)
        stops, sampler, decoder = StopStrings(stop), Sampler(sampling), big.tokenizer.stream_decoder()
        recorder = TraceRecorder(trace, big, small)
        result = GenerationResult(prompt_ids=ids)
        tokens, eos = result.token_ids, big.tokenizer.eos_ids
        capture = trace.big_layers
        error: JudgeError | None = None
        ahead: tuple[LayerDeltas | None, ForwardResult] | None = None  # issued ahead
        self._abort.clear()
        start = time.perf_counter()
        try:
            try:
                if mirror is not None:
                    mirror.start(prompt, ids, chat, small_capture)
                for step in range(max_new_tokens):
                    if self._abort.is_set():
                        result.finish_reason = "aborted"
                        break
                    record, decided = self._step(step, result, steer_prompt, capture, sampler,
                                                 recorder, ahead)
                    result.steps.append(record)
                    token = record.token
                    if token in eos and not ignore_eos:
                        result.finish_reason = "eos"
                        yield self._emit(StepEvent(record, ""), on_event)
                        break
                    tokens.append(token)
                    piece = stops.feed(decoder.feed(token))
                    result.text += piece
                    if self.overlap and not stops.stopped and step + 1 < max_new_tokens:
                        deltas = self.mixes.deltas(decided)  # speculation: judges hold
                        ahead = (deltas, big.step(token, deltas, capture))
                    if mirror is not None:
                        mirror.feed(token)
                    yield self._emit(StepEvent(record, piece), on_event)
                    if stops.stopped:
                        result.finish_reason = "stop"
                        break
            except JudgeError as e:
                result.finish_reason, error = "error", e
            if mirror is not None:
                mirror.finish()
        except KeyboardInterrupt:
            result.finish_reason = "interrupted"
        tail = stops.drain(decoder)
        if tail:
            result.text += tail
            yield self._emit(StepEvent(None, tail), on_event)
        recorder.finish(result)
        result.small_ids = list(mirror.ids) if mirror is not None else None
        result.elapsed_s = time.perf_counter() - start
        if error is not None:
            error.result = result
            raise error
        return result

    def _step(self, step: int, result: GenerationResult, steer_prompt: bool,
              capture: Sequence[int], sampler: Sampler, recorder: TraceRecorder,
              ahead: tuple[LayerDeltas | None, ForwardResult] | None,
              ) -> tuple[StepRecord, frozenset[str]]:
        """Judge, forward (and maybe re-run) the big model, sample; record the step.

        ``ahead``: (deltas, output) of this step's big forward, already issued; kept if this
        step runs with the same deltas object, else rewound (a speculation miss, counted in
        ``result``). Returns the record and the pre-step judges' decision.
        """
        t0 = time.perf_counter()
        ids, tokens = result.prompt_ids, result.token_ids
        mirror = self.mirror
        small_hidden = mirror.hidden if mirror is not None else {}
        small_logits = mirror.logits if mirror is not None else None
        scores: dict[str, float] = {}
        can_steer = step > 0 or steer_prompt
        decided = steer = NO_MIXES
        if self._pre:
            ctx = JudgeContext(step, tokens, small_hidden, small_logits)
            decided = steer = self._decide(self._pre, ctx, scores)
        if not can_steer:
            steer = NO_MIXES
        deltas = self.mixes.deltas(steer)
        judge_s = time.perf_counter() - t0
        last = ids[-1] if step == 0 else tokens[-1]
        if step == 0:
            out = self.big.prefill(ids, deltas, capture)
        elif ahead is not None and ahead[0] is deltas:
            out = ahead[1]
        else:
            if ahead is not None:  # the judges or a controller changed: drop the speculation
                self.big.rewind(1)
                result.speculation_misses += 1
            out = self.big.step(last, deltas, capture)
        first, unsteered_token, unsteered_prob = None, None, None
        if self._post:
            t1 = time.perf_counter()
            ctx = JudgeContext(step, tokens, small_hidden, small_logits, out.logits, steer)
            added = self._decide(self._post, ctx, scores)
            rerun = can_steer and not added <= steer
            if rerun:
                steer = steer | added
                deltas = self.mixes.deltas(steer)
            judge_s += time.perf_counter() - t1
            if rerun:
                first = out
                unsteered_token, unsteered_prob = sampler.sample(out.logits)
                if step == 0:  # the mix steers the whole prompt, as a pre-step decision would
                    out = self.big.prefill(ids, deltas, capture)
                else:
                    self.big.rewind(1)
                    out = self.big.forward([last], deltas, capture)
        token, prob = sampler.sample(out.logits)
        record = StepRecord(step, token, prob, scores, tuple(sorted(steer)), first is not None,
                            unsteered_token, unsteered_prob, judge_s)
        recorder.add(out, first, deltas, small_hidden, small_logits)
        return record, decided

    @staticmethod
    def _decide(judges: list[Judge], ctx: JudgeContext, scores: dict[str, float]) -> frozenset[str]:
        """Union of the judges' mixes; each score goes into ``scores``."""
        steer = NO_MIXES
        for judge in judges:
            try:
                verdict = judge.decide(ctx)
            except Exception as e:
                raise JudgeError(judge.name, ctx.step, e) from e
            scores[judge.name] = verdict.score
            if verdict.steer:
                if not verdict.steer.issubset(judge.mixes):
                    raise JudgeError(judge.name, ctx.step, KeyError(
                        f"turned on {sorted(verdict.steer)}; it declares only {list(judge.mixes)}"))
                steer = steer | verdict.steer
        return steer

    @staticmethod
    def _emit(event: StepEvent, on_event: Callable[[StepEvent], None] | None) -> StepEvent:
        if on_event is not None:
            on_event(event)
        return event
