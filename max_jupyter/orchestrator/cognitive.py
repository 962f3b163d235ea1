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
the big model's forward of step ``t + 1`` (feeding token ``t``) is issued *ahead*, before
step 5, with the deltas that step ``t``'s pre-step judges chose, so the two models' work
overlaps on the device. Step ``t + 1`` keeps that forward if its judges choose the same
deltas (same mixes, no mix changed); otherwise the big model rewinds one position and
forwards again (``GenerationResult.ahead_misses`` counts these; they are not re-runs).
Tokens, records and trace are those of the order above; only the schedule differs. This is
not speculative decoding (below): nothing is drafted or verified.

Speculative decoding (``speculate=k``; see ``speculative``): at a step ``t >= 1`` the
pre-step judges decide step ``t`` as usual, then the small model drafts up to ``k`` tokens
through the mirror and the big model verifies them in one ``Engine.verify``, row ``j``
with step ``t + j``'s steering (the mixes snapshotted when the block begins: a change from
another thread lands at the next block). Where every pre-step judge can be checkpointed
(``Judge.checkpoint``), they judge rows ``1..k-1`` ahead, on the small state after each
drafted token, and are put back where those tokens are not emitted; the last row, and
every row where a judge cannot, takes the decision before it. The rule of speculative
sampling (greedy: the matching prefix) keeps a prefix and draws the token after it. These
tokens then go through the steps one at a time, with the verify pass's rows as each step's
big state: a block token ``j >= 1`` not judged ahead is judged now, once, on the small
state before it; if the judges choose other mixes than its row ran with, the block ends
there (both caches rewound to the state before that step's forward) and the step runs as
a plain one with that decision. Post-step judges see each row's logits; if they add a
mix, the block ends there and the step is re-run from the row as from a first pass. So
every token is chosen under the steering the non-speculative loop would give it, each
judge's emitted steps see the same inputs and state as there, and the decision to end a
block depends only on earlier tokens (sampling stays exact). Both caches rewind the
rejected tail (also when EOS, a stop string or an abort ends the generation inside a
block). A speculating generation does not overlap (the verify replaces it). Not with a
small model of another vocabulary or an engine without ``supports_verify``: the
generation then runs without it and says why in ``GenerationResult.speculate_off``.
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from max_jupyter.engines.base import Engine, ForwardResult, LayerDeltas, check_layers, check_room
from max_jupyter.engines.intervention import labels
from max_jupyter.errors import BadArgumentError, warn_deprecated
from max_jupyter.orchestrator.judges import (
    NO_MIXES,
    Judge,
    JudgeContext,
    JudgeError,
    JudgeLike,
    as_judges,
    check_judges,
)
from max_jupyter.orchestrator.mirror import ContextMirror, shares_vocabulary
from max_jupyter.orchestrator.options import GenerationOptions, merge_options
from max_jupyter.orchestrator.resolver import SteeringResolver
from max_jupyter.orchestrator.sampling import Sampler
from max_jupyter.orchestrator.speculative import (
    Block,
    DraftLength,
    Pace,
    RowSteering,
    SmallState,
    draft_and_verify,
)
from max_jupyter.orchestrator.stopping import StopStrings
from max_jupyter.orchestrator.trace import GenerationResult, StepEvent, StepRecord, TraceRecorder
from max_jupyter.orchestrator.types import Prompt, Steering, prompt_ids, run_to_end, with_system
from max_jupyter.tokenizer import StreamDecoder

DEFAULT_OPTIONS = GenerationOptions()

Ahead = tuple[LayerDeltas | None, ForwardResult]
"""A big forward issued ahead of its step: the deltas it ran with and its output."""


@dataclass
class PreparedRun:
    """One generation, checked and set up by ``prepare`` (no forward pass yet); ``run``
    carries it out once."""

    prompt: Prompt
    chat: bool
    result: GenerationResult
    max_new_tokens: int
    sampler: Sampler
    stops: StopStrings
    decoder: StreamDecoder
    recorder: TraceRecorder
    capture: tuple[int, ...]
    small_capture: list[int]
    steer_prompt: bool
    ignore_eos: bool
    abort: threading.Event
    on_event: Callable[[StepEvent], None] | None
    ahead: Ahead | None = None
    draft: DraftLength | None = None
    block: Block | None = None
    start: float = field(default_factory=time.perf_counter)


@dataclass
class _Forward:
    """A step's big-model pass: its output, deltas, the mixes judges turned on for it and
    the live mix's coefficients, and a first pass if re-run."""

    out: ForwardResult
    deltas: LayerDeltas | None
    mixes_on: frozenset[str]
    coefs: dict[str, float]
    first: ForwardResult | None = None
    unsteered: tuple[int, float] | None = None


@dataclass
class _Judged:
    """A step's judging: the pre-step judges' decision, every judge's score, the seconds
    spent in judges (pre- and post-step)."""

    decided: frozenset[str] = NO_MIXES
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class CognitiveOrchestrator:
    """Generates with ``big``, mirrored by ``small`` (optional), steered by ``steering``
    always and by the mixes in ``mixes`` that ``judges`` turn on.

    ``steering``: steering applied at every step whatever the judges say (the Session's
    live mix and a call's own steering: a ``Mix`` or vector, or a sequence of them; the
    first one's coefficients are recorded per step in ``StepRecord.live_coefs``).
    ``mixes``: the named mixes judges may turn on — a ``Mix`` or vector (named
    ``"default"``) or a mapping name -> Mix/vector. All for the big model. A mix may be
    changed from another thread at any time: the change applies whole from the next step.
    (``steering=`` used to name the judge-gated mixes and ``mix=`` the always-on steering;
    ``mix=`` and that old use warn with a ``DeprecationWarning``.)
    Construction checks the models, judges and mixes fit together. Without a small model
    and judges this is the plain loop (``plain.generate``). ``overlap``: issue each big
    step ahead of the mirror's (see the module); ``None``: where it pays
    (``big.launches_async``, a small model and pre-step judges); a generation with
    ``speculate`` does not overlap. ``pace``: speculation's measured pace, kept across
    generations (``speculative.Pace``; None: each generation times its own).
    """

    pace_speculation: bool = True
    """Pause speculative decoding where it costs more wall time per token than plain steps
    (``speculative.DraftLength``); False drafts by acceptance alone (to measure it)."""
    pace_clock: Callable[[], float] = staticmethod(time.perf_counter)
    """The wall clock pacing reads (a test may give it a clock of its own)."""

    def __init__(self, big: Engine, small: Engine | None = None,
                 judges: JudgeLike | Sequence[JudgeLike] | None = None,
                 mixes: Steering | Mapping[str, Steering] = None, mirror_window: int = 8,
                 overlap: bool | None = None, *, steering: Steering | Sequence[Steering] = None,
                 mix: Steering | Sequence[Steering] = None, pace: Pace | None = None):
        self.big, self.small = big, small
        self.pace = pace
        self.judges = as_judges(judges)
        mixes, steering = _old_keywords(self.judges, mixes, steering, mix)
        always = steering if isinstance(steering, Sequence) else [steering]
        self.resolver = SteeringResolver(big, mixes, always)
        self.mirror = ContextMirror(big, small, mirror_window) if small is not None else None
        check_judges_fit(big, small, self.judges, self.resolver,
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

    def generate(self, prompt: Prompt, options: GenerationOptions | None = None, *,
                 on_event: Callable[[StepEvent], None] | None = None,
                 abort: threading.Event | None = None, **changes) -> GenerationResult:
        """Run ``stream`` to the end and return its result (see ``stream``)."""
        return run_to_end(self.stream(prompt, options, on_event=on_event, abort=abort, **changes))

    def stream(self, prompt: Prompt, options: GenerationOptions | None = None, *,
               on_event: Callable[[StepEvent], None] | None = None,
               abort: threading.Event | None = None, **changes) -> Iterator[StepEvent]:
        """Yield a ``StepEvent`` per step (also passed to ``on_event`` first); the return
        value (``StopIteration.value``) is the ``GenerationResult``.

        ``options`` (default ``GenerationOptions()``) with ``changes`` (option names, or
        ``temperature`` / ``top_k`` / ``top_p`` / ``seed``): see ``GenerationOptions``.
        Its ``steering``, ``judges`` and ``mirror`` belong to the Session; here steering and
        judges are given when the orchestrator is built, so those two are refused.
        ``abort``: an event that stops the generation before its next step when set
        (default: the one ``abort()`` sets). ``speculate``: the longest draft of speculative
        decoding (see the module: greedy gives the same tokens, sampling the same
        distribution of tokens; the caches end the same).

        Ctrl-C (also inside a callback or judge) ends the generation with
        ``finish_reason == "interrupted"`` and the partial result; both caches stay
        consistent and the next generation starts from fresh prefills. A judge that raises
        stops the generation; ``JudgeError`` (naming the judge and step) is raised with
        the partial result in its ``result``; so is any other error, with ``result`` set
        where the exception allows it.
        """
        options = merge_options(options, DEFAULT_OPTIONS, changes)
        if options.steering is not None or options.judges is not None:
            raise BadArgumentError("steering= and judges= of one generation are the Session's; "
                                   "give the orchestrator steering=, mixes= and judges when "
                                   "you build it.")
        return (yield from self.run(self.prepare(prompt, options, on_event=on_event, abort=abort)))

    def run(self, run: PreparedRun) -> Iterator[StepEvent]:
        """Carry out a prepared generation (see ``stream``); its events, then its result."""
        result, error = run.result, None
        run.start = time.perf_counter()
        result.start_mix = dict(self.resolver.live_coefs())
        try:
            try:
                yield from self._steps(run)
            except Exception as e:  # a judge or a real bug: stop, keep what was made
                result.finish_reason, error = "error", e
            if self.mirror is not None:
                self.mirror.finish()
        except KeyboardInterrupt:
            result.finish_reason = "interrupted"
        tail = run.stops.drain(run.decoder)
        result.incomplete = run.decoder.incomplete
        if tail:
            result.text += tail
            yield self._emit(StepEvent(None, tail), run.on_event)
        self._finish(run)
        if error is not None:
            _attach_result(error, result)
            raise error
        return result

    def prepare(self, prompt: Prompt, options: GenerationOptions = DEFAULT_OPTIONS, *,
                on_event: Callable[[StepEvent], None] | None = None,
                abort: threading.Event | None = None) -> PreparedRun:
        """Check the prompt and what of ``options`` needs the models (the context's room,
        the trace layers) and set up one generation (no forward pass: safe on any thread).
        ``options.system`` goes before the prompt; ``steering``, ``judges`` and ``mirror``
        are not read here (the Session builds the orchestrator from them)."""
        options = merge_options(options, DEFAULT_OPTIONS, {})  # checks its type
        big, small, mirror, trace = self.big, self.small, self.mirror, options.trace
        prompt = with_system(prompt, options.system)
        n = options.max_new_tokens
        ids = prompt_ids(big, prompt, options.chat)
        check_room(big, len(ids) + n, from_empty=True)
        check_layers(big.identity, trace.big_layers, "trace big_layers")
        if trace.small_layers and small is None:
            raise BadArgumentError("trace small_layers asks for small-model states, but there is no "
                                   "small model.")
        small_capture = sorted({*trace.small_layers, *(l for j in self.judges for l in j.small_layers)})
        if small is not None:
            check_layers(small.identity, small_capture, "trace small_layers")
            if mirror.shares_vocab:
                check_room(small, len(ids) + n, from_empty=True)
        if abort is None:
            abort = self._abort
            abort.clear()
        speculate = options.speculate
        off = self._speculate_off() if speculate else None
        return PreparedRun(prompt, options.chat, GenerationResult(prompt_ids=ids, speculate_off=off),
                           n, Sampler(options.sampling), StopStrings(options.stop),
                           big.tokenizer.stream_decoder(), TraceRecorder(trace, big, small),
                           tuple(trace.big_layers), small_capture, options.steer_prompt,
                           options.ignore_eos, abort, on_event,
                           draft=DraftLength(speculate, self.pace_speculation, self.pace or Pace(),
                                             warm_up=big.use_graphs)
                           if speculate and off is None else None)

    def _speculate_off(self) -> str | None:
        """Why this orchestrator cannot speculate, or None if it can."""
        if self.mirror is None:
            return "there is no small model to draft"
        if not self.mirror.shares_vocab:
            return "the small model's vocabulary differs from the big model's"
        if not self.big.supports_verify:
            return f"the big engine ({type(self.big).__name__}) has no verify forward"
        return None

    def _steps(self, run: PreparedRun) -> Iterator[StepEvent]:
        """The steps of one generation, up to EOS, a stop string, the length or an abort."""
        if self.mirror is not None:
            self.mirror.start(run.prompt, run.result.prompt_ids, run.chat, run.small_capture)
        try:
            for step in range(run.max_new_tokens):
                if run.abort.is_set():
                    run.result.finish_reason = "aborted"
                    return
                event, finish = self._advance(step, run)
                if finish is not None:  # set first: a consumer may close the iterator at the event
                    run.result.finish_reason = finish
                yield self._emit(event, run.on_event)
                if finish is not None:
                    return
        finally:
            if run.block is not None:  # ended inside a speculative block
                block, run.block = run.block, None
                block.settle(self.big, self.mirror, run.result.finish_reason == "eos")
                self._restore_judges(block.checkpoint_from(block.next))

    def _advance(self, step: int, run: PreparedRun) -> tuple[StepEvent, str | None]:
        """Run step ``step`` and take its token: the event and the finish reason, if any."""
        result = run.result
        record, decided, in_small = self._take(step, run)
        result.steps.append(record)
        token = record.token
        if token in self.big.tokenizer.eos_ids and not run.ignore_eos:
            return StepEvent(record, ""), "eos"
        result.token_ids.append(token)
        piece = run.stops.feed(run.decoder.feed(token))
        result.text += piece
        if self.overlap and run.draft is None and not run.stops.stopped and step + 1 < run.max_new_tokens:
            deltas, _ = self.resolver.resolve(decided, step + 1)  # ahead: as if the judges hold
            run.ahead = (deltas, self.big.step(token, deltas, run.capture))
        if self.mirror is not None and not in_small:
            self.mirror.feed(token)
        return StepEvent(record, piece), "stop" if run.stops.stopped else None

    def _take(self, step: int, run: PreparedRun) -> tuple[StepRecord, frozenset[str], bool]:
        """Step ``step`` from a speculative block (drafting and verifying a new one where
        the draft length allows) or a plain ``_step``: the record, the pre-step judges'
        decision and whether the token is already in the small cache (an accepted draft)."""
        draft = run.draft
        if draft is None:
            return (*self._step(step, run), False)
        if run.block is not None:
            return self._block_step(step, run)
        now = self.pace_clock()
        draft.clock(now, step)
        k = min(draft.k, run.max_new_tokens - step - 1)  # a block ends by the last step
        draft.begin(now, step, k)  # (step 0, the prefill, is never timed)
        if step > 0 and k > 0:
            return self._start_block(step, run, k)
        small_logits = self.mirror.logits  # its argmax waits for the small model: after the big step
        record, decided = self._step(step, run)
        draft.after_plain(int(small_logits.argmax()), record.token)
        return record, decided, False

    def _start_block(self, step: int, run: PreparedRun, k: int
                     ) -> tuple[StepRecord, frozenset[str], bool]:
        """Judge step ``step``, draft ``k`` tokens and verify them, each row with its step's
        steering (``_plan_rows``), then hand out the block's first token."""
        mirror = self.mirror
        judged = self._judge_pre(step, run, (mirror.hidden, mirror.logits))
        run.block = draft_and_verify(self.big, mirror, run.sampler, run.result.token_ids[-1], k,
                                     run.capture, functools.partial(self._plan_rows, step, run, judged))
        self._restore_judges(run.block.checkpoint_from(run.block.accepted + 1))  # judged, not emitted
        run.draft.after_draft(k, run.block.accepted)
        return self._block_step(step, run)

    def _plan_rows(self, step: int, run: PreparedRun, judged: _Judged, drafted: list[int],
                   states: list[SmallState]) -> list[RowSteering]:
        """The steering of each verify row of a block begun at ``step`` (``judged``: that
        step's pre-step judging): row ``j`` is step ``step + j``, resolved at that step.
        Where every pre-step judge can be checkpointed (``Judge.checkpoint``), they judge
        rows ``1..k-1`` now, on the small state after each drafted token (``states[j]``)
        and the tokens with the draft so far: what they would decide when the row's step
        is handed out, since its state and tokens are those of an accepted draft. The last
        row (its state comes only with the verify), and every row where a judge cannot be
        checkpointed, takes the decision of the row before it, checked when handed out."""
        rows = [self._row(step, judged.decided, judged)]
        checkpoint = tuple(j.checkpoint() for j in self._pre)
        ahead = None not in checkpoint
        tokens = run.result.token_ids
        for j in range(1, len(drafted) + 1):
            if ahead and j < len(drafted):
                judged = self._judge_pre(step + j, run, states[j], [*tokens, *drafted[:j]])
                rows.append(self._row(step + j, judged.decided, judged, checkpoint))
                checkpoint = tuple(judge.checkpoint() for judge in self._pre)
            else:
                rows.append(self._row(step + j, rows[-1].mixes_on))
        return rows

    def _row(self, step: int, mixes_on: frozenset[str], judged: _Judged | None = None,
             checkpoint: tuple | None = None) -> RowSteering:
        """Step ``step``'s steering with the mixes ``mixes_on`` (see ``RowSteering``)."""
        deltas, coefs = self.resolver.resolve(mixes_on, step)
        return RowSteering(deltas, mixes_on, coefs, judged, checkpoint)

    def _restore_judges(self, checkpoint: tuple | None) -> None:
        """Put the pre-step judges back to ``checkpoint`` (None: nothing was judged ahead)."""
        if checkpoint is not None:
            for judge, state in zip(self._pre, checkpoint):
                judge.restore(state)

    def _block_step(self, step: int, run: PreparedRun) -> tuple[StepRecord, frozenset[str], bool]:
        """Hand out the next token of the speculative block as step ``step``, judged ahead
        or now; or end the block where the judges now steer this step otherwise than its
        row and run it as a plain step (see the module)."""
        block, small = run.block, run.block.state
        steering, judged = block.row, block.row.judged
        if judged is None:
            judged = self._judge_pre(step, run, small)
            if judged.decided != steering.mixes_on:
                run.block = None  # first: an interrupt inside cut must not settle it again
                block.cut(self.big, self.mirror, fed=False)
                return (*self._step(step, run, judged), False)
        stats = (block.drafted, block.accepted) if block.next == 0 else ((), 0)
        token, prob, row = block.peek()
        fwd = _Forward(row, steering.deltas, steering.mixes_on, steering.coefs)
        extra = self._judge_post(step, run, fwd, judged, small)
        if extra:  # re-run the step from the row, as the plain loop re-runs its first pass
            run.block = None
            block.cut(self.big, self.mirror, fed=True)
            self._restore_judges(block.checkpoint_from(block.next + 1))
            fwd = self._rerun(step, run, fwd, fwd.mixes_on | extra)
            token, prob = run.sampler.sample(fwd.out.logits)
            in_small = False
        else:
            in_small = block.advance()
            if block.done:
                run.block = None
        record = self._record(step, run, token, prob, judged, fwd, small, *stats)
        return record, judged.decided, in_small

    def _step(self, step: int, run: PreparedRun, judged: _Judged | None = None
              ) -> tuple[StepRecord, frozenset[str]]:
        """Judge (unless ``judged`` holds this step's pre-step judging already), forward
        (and maybe re-run) the big model, sample; record the step. Returns the record and
        the pre-step judges' decision."""
        mirror = self.mirror
        small = (mirror.hidden, mirror.logits) if mirror is not None else ({}, None)
        if judged is None:
            judged = self._judge_pre(step, run, small)
        can_steer = step > 0 or run.steer_prompt
        fwd = self._forward(step, run, judged.decided if can_steer else NO_MIXES, can_steer)
        extra = self._judge_post(step, run, fwd, judged, small)
        if can_steer and extra:
            fwd = self._rerun(step, run, fwd, fwd.mixes_on | extra)
        token, prob = run.sampler.sample(fwd.out.logits)
        return self._record(step, run, token, prob, judged, fwd, small), judged.decided

    def _judge_pre(self, step: int, run: PreparedRun, small: SmallState,
                   tokens: Sequence[int] | None = None) -> _Judged:
        """Run the pre-step judges of step ``step`` on the small state ``small`` and the
        tokens so far (default: those emitted)."""
        t0 = time.perf_counter()
        judged = _Judged()
        if self._pre:
            ctx = JudgeContext(step, run.result.token_ids if tokens is None else tokens, *small)
            judged.decided = self._decide(self._pre, ctx, judged.scores)
        judged.seconds = time.perf_counter() - t0
        return judged

    def _judge_post(self, step: int, run: PreparedRun, fwd: _Forward, judged: _Judged,
                    small: SmallState) -> frozenset[str]:
        """Run the post-step judges on ``fwd``'s logits (their scores and time go into
        ``judged``); the mixes they turn on that ``fwd`` did not run with."""
        if not self._post:
            return NO_MIXES
        t0 = time.perf_counter()
        ctx = JudgeContext(step, run.result.token_ids, *small, fwd.out.logits, fwd.mixes_on)
        added = self._decide(self._post, ctx, judged.scores)
        judged.seconds += time.perf_counter() - t0
        return added - fwd.mixes_on

    @staticmethod
    def _record(step: int, run: PreparedRun, token: int, prob: float, judged: _Judged,
                fwd: _Forward, small: SmallState, drafted: tuple[int, ...] = (),
                accepted: int = 0, model_prob: float | None = None,
                top: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepRecord:
        """The step's record; its trace row goes to the recorder. ``model_prob`` and
        ``top`` (the logits' top-k): where already computed (a batch does every row's at once)."""
        unsteered_token, unsteered_prob = fwd.unsteered or (None, None)
        run.recorder.add(fwd.out, fwd.first, fwd.deltas, *small, top=top)
        if model_prob is None:
            logits = fwd.out.logits  # raw, before the sampler's transforms
            model_prob = float(torch.exp(logits[token].float() - torch.logsumexp(logits.float(), -1)))
        return StepRecord(step, token, prob, judged.scores, tuple(sorted(fwd.mixes_on)),
                          fwd.first is not None, unsteered_token, unsteered_prob, judged.seconds,
                          fwd.coefs, fwd.deltas is not None, drafted, accepted, model_prob,
                          labels(fwd.deltas))

    def _forward(self, step: int, run: PreparedRun, mixes_on: frozenset[str], can_steer: bool
                 ) -> _Forward:
        """The big model's pass for step ``step`` with the mixes ``mixes_on`` (and the
        always-on steering where ``can_steer``): a prefill at step 0, else one token — or
        the forward issued ahead, if it ran with the same deltas (else rewound: an ahead
        miss)."""
        deltas, coefs = self.resolver.resolve(mixes_on, step) if can_steer else (None, {})
        big, ahead, run.ahead = self.big, run.ahead, None
        if step == 0:
            return _Forward(big.prefill(run.result.prompt_ids, deltas, run.capture), deltas,
                            mixes_on, coefs)
        if ahead is not None and ahead[0] is deltas:
            return _Forward(ahead[1], deltas, mixes_on, coefs)
        if ahead is not None:  # the judges or a mix changed: drop the forward issued ahead
            big.rewind(1)
            run.result.ahead_misses += 1
        return _Forward(big.step(run.result.token_ids[-1], deltas, run.capture), deltas,
                        mixes_on, coefs)

    def _rerun(self, step: int, run: PreparedRun, first: _Forward, mixes_on: frozenset[str]
               ) -> _Forward:
        """Re-run step ``step`` with the mixes ``mixes_on`` after a post-step judge added
        one; keeps the first pass and what it would have sampled."""
        deltas, coefs = self.resolver.resolve(mixes_on, step)
        unsteered = run.sampler.sample(first.out.logits)
        if step == 0:  # the mix steers the whole prompt, as a pre-step decision would
            out = self.big.prefill(run.result.prompt_ids, deltas, run.capture)
        else:
            self.big.rewind(1)
            out = self.big.forward([run.result.token_ids[-1]], deltas, run.capture)
        return _Forward(out, deltas, mixes_on, coefs, first.out, unsteered)

    def _finish(self, run: PreparedRun) -> None:
        """Stack the trace, note the small model's context and the time taken."""
        result = run.result
        run.recorder.finish(result)
        result.small_ids = list(self.mirror.ids) if self.mirror is not None else None
        result.elapsed_s = time.perf_counter() - run.start

    @staticmethod
    def _decide(judges: list[Judge], ctx: JudgeContext, scores: dict[str, float]) -> frozenset[str]:
        """Union of the mixes the judges turn on; each score goes into ``scores``."""
        turn_on = NO_MIXES
        for judge in judges:
            try:
                verdict = judge.decide(ctx)
            except Exception as e:
                raise JudgeError(judge.name, ctx.step, e) from e
            scores[judge.name] = verdict.score
            if verdict.turn_on:
                if not verdict.turn_on.issubset(judge.turns_on):
                    raise JudgeError(judge.name, ctx.step, KeyError(
                        f"turned on {sorted(verdict.turn_on)}; it declares only "
                        f"{list(judge.turns_on)}"))
                turn_on = turn_on | verdict.turn_on
        return turn_on

    @staticmethod
    def _emit(event: StepEvent, on_event: Callable[[StepEvent], None] | None) -> StepEvent:
        if on_event is not None:
            on_event(event)
        return event


def check_judges_fit(big: Engine, small: Engine | None, judges: Sequence[Judge],
                     mixes: Collection[str], shared_vocab: bool | None = None) -> None:
    """Raise the orchestrator's error if ``judges`` cannot run with these engines and the
    named mixes ``mixes`` (the rule ``CognitiveOrchestrator`` applies when built; the
    Session checks a new judge with it before anything changes). Same vocabulary means
    equal vocabularies (token -> id), not equal sizes: models of one tokenizer may pad
    their embeddings differently. ``shared_vocab``: already known (else compared here)."""
    if shared_vocab is None:
        shared_vocab = small is not None and shares_vocabulary(big, small)
    check_judges(judges, mixes, big.identity, small.identity if small is not None else None,
                 shared_vocab)


def _old_keywords(judges: list[Judge], mixes, steering, mix) -> tuple:
    """``(mixes, steering)`` from the old keywords: ``mix=`` was the always-on steering, and
    ``steering=`` named the judge-gated mixes. Where judges turn on mixes but only
    ``steering=`` is given, the caller means the old use (the new one would find none of
    their mixes): read it as ``mixes=``, with a warning."""
    if mix is not None:
        warn_deprecated("CognitiveOrchestrator(mix=...)", "steering= (always-on steering)", 4)
        if steering is not None and mixes is not None:
            raise BadArgumentError("mix= is the old name of steering=; give steering= only.")
        if steering is not None:  # wholly the old use: steering= gated, mix= always-on
            return steering, mix
        steering = mix
    if (mixes is None and steering is not None and not isinstance(steering, Sequence)
            and any(j.turns_on for j in judges)):
        warn_deprecated("CognitiveOrchestrator(judges, steering=<mixes the judges turn on>)",
                        "mixes= for the judge-gated mixes: steering= now means steering "
                        "applied at every step", 4)
        return steering, None
    return mixes, steering


def _attach_result(error: Exception, result: GenerationResult) -> None:
    """Give ``error`` the partial result as ``error.result`` where it can hold one."""
    try:
        error.result = result
    except AttributeError:  # exceptions with __slots__ (rare) keep their traceback only
        pass
