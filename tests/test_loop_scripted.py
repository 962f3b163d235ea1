"""The generation loop's logic on scripted engines (``max_jupyter.testing.ScriptedEngine``):
steering per step, judges before and after the step (with re-runs), the mirror's cache
invariants, the overlap, stop strings, EOS, interrupts and judge errors. Each expected token
comes from a hand-written greedy loop over the same engine, so a step fed with the wrong
deltas, a re-run that did not rewind or a mirror that lost a token shows as other tokens."""
from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from max_jupyter.engines import residual
from max_jupyter.orchestrator import CognitiveOrchestrator, FunctionJudge, ProbeJudge, TraceConfig
from max_jupyter.orchestrator.judges import JudgeError
from max_jupyter.steering import Mix, SteeringVector
from max_jupyter.testing import ScriptedEngine

PROMPT = "Tell me about rain."
LAYER = 2  # where the test vectors steer


@pytest.fixture(scope="module")
def big() -> ScriptedEngine:
    return ScriptedEngine(seed=0)


@pytest.fixture(scope="module")
def small() -> ScriptedEngine:
    """Another scripted model of the same vocabulary (the mirror passes ids across)."""
    return ScriptedEngine(seed=1)


@pytest.fixture(scope="module")
def other() -> ScriptedEngine:
    """A scripted model of another vocabulary (the mirror passes text across)."""
    return ScriptedEngine(seed=2, vocab_size=290)


@pytest.fixture(autouse=True)
def no_hooks(big, small, other):
    yield
    for engine in (big, small, other):
        engine.before_forward = None


def toward(engine: ScriptedEngine, token: int) -> SteeringVector:
    """A vector at ``LAYER`` along ``token``'s head row."""
    return SteeringVector({LAYER: engine.direction(token)}, engine.identity, f"to{token}")


def push(engine: ScriptedEngine, norm: float = 100.0) -> float:
    """The coefficient that adds a delta of length ``norm`` at ``LAYER`` (one layer: the
    coefficient times the layer's typical residual norm)."""
    return norm / residual.measure(engine)[LAYER]


def pushing(engine: ScriptedEngine, token: int, norm: float = 100.0) -> Mix:
    """A mix that makes ``token`` the greedy choice wherever it is added."""
    return Mix.of(toward(engine, token), push(engine, norm))


def greedy(engine: ScriptedEngine, ids: list[int], n: int, steer_at=lambda step: None,
           steer_prompt: bool = True) -> list[int]:
    """``n`` greedy tokens by hand: step ``t``'s forward gets ``steer_at(t)``'s deltas (a
    mix, or None); the prompt's prefill is step 0's forward."""
    def deltas(step):
        mix = steer_at(step)
        return None if mix is None else mix.deltas(engine)
    out = engine.prefill(ids, deltas(0) if steer_prompt else None)
    tokens = []
    for step in range(n):
        tokens.append(int(out.logits.argmax()))
        if step + 1 < n:
            out = engine.step(tokens[-1], deltas(step + 1))
    return tokens


def test_plain_greedy_equals_the_hand_loop(big):
    result = CognitiveOrchestrator(big).generate(PROMPT, max_new_tokens=24)
    assert result.token_ids == greedy(big, big.tokenizer.chat(PROMPT), 24)
    assert result.finish_reason == "length" and len(result.steps) == 24
    assert big.cached_ids == result.prompt_ids + result.token_ids[:-1]
    assert result.text == big.tokenizer.decode(result.token_ids)


@pytest.mark.parametrize("steer_prompt", [True, False])
def test_a_mix_steers_every_step_and_the_prompt_if_asked(big, steer_prompt):
    target = big.tokenizer.encode(" the")[0]
    mix = pushing(big, target)
    result = CognitiveOrchestrator(big, steering=mix).generate(PROMPT, max_new_tokens=8,
                                                          steer_prompt=steer_prompt)
    ids = big.tokenizer.chat(PROMPT)
    assert result.token_ids == greedy(big, ids, 8, lambda step: mix, steer_prompt)
    unsteered = greedy(big, ids, 1)[0]
    assert unsteered != target
    assert result.token_ids[0] == (target if steer_prompt else unsteered)
    assert result.token_ids[1:] == [target] * 7
    assert all(r.steered for r in result.steps[1:]) and result.steps[0].steered == steer_prompt


def test_a_live_mix_change_lands_at_the_next_step(big):
    target = big.tokenizer.encode(" st")[0]
    live = Mix(big.identity)

    def on_event(event):
        if event.record is not None and event.record.step == 4:
            live.set("push", toward(big, target), push(big))

    result = CognitiveOrchestrator(big, steering=live).generate(PROMPT, max_new_tokens=10, on_event=on_event)
    expected = greedy(big, result.prompt_ids, 10, lambda step: pushing(big, target) if step >= 5 else None)
    assert result.token_ids == expected and expected[5:] == [target] * 5
    assert [r.live_coefs for r in result.steps] == [{}] * 5 + [{"push": push(big)}] * 5
    assert [r.steered for r in result.steps] == [False] * 5 + [True] * 5


def test_pre_step_judges_steer_the_steps_they_turn_on(big):
    target = big.tokenizer.encode(" do")[0]
    on = {2, 3, 7}  # (a steered prompt would favour the target later too, through the cache)
    judge = FunctionJudge(lambda ctx: ctx.step in on, mix="push", name="steps")
    result = CognitiveOrchestrator(big, judges=judge, mixes={"push": pushing(big, target)}
                                   ).generate(PROMPT, max_new_tokens=10)
    assert result.token_ids == greedy(big, result.prompt_ids, 10,
                                      lambda step: pushing(big, target) if step in on else None)
    assert [r.mixes_on for r in result.steps] == [("push",) if t in on else () for t in range(10)]
    assert [t for t, token in enumerate(result.token_ids) if token == target] == sorted(on)
    assert not any(r.rerun for r in result.steps)


def test_post_step_judges_re_run_the_step_steered(big):
    """A post-step judge that fires on the first pass re-runs the step with its mix (step 0:
    the prompt's prefill again); the cache then holds the re-run, not the first pass."""
    target = big.tokenizer.encode(" re")[0]
    fired = {0, 2, 5, 6}
    seen = []

    def judge(ctx):
        seen.append((ctx.step, ctx.mixes_on, int(ctx.big_logits.argmax())))
        return ctx.step in fired

    result = CognitiveOrchestrator(
        big, judges=FunctionJudge(judge, post_step=True, mix="push", name="late"),
        mixes={"push": pushing(big, target)}).generate(PROMPT, max_new_tokens=9)
    steer_at = lambda step: pushing(big, target) if step in fired else None  # noqa: E731
    expected = greedy(big, result.prompt_ids, 9, steer_at)
    assert result.token_ids == expected
    assert [r.rerun for r in result.steps] == [t in fired for t in range(9)]
    assert [step for step, _, _ in seen] == list(range(9))  # once a step, on the first pass
    for record, (_, steering, first_choice) in zip(result.steps, seen, strict=True):
        assert steering == frozenset()
        if record.rerun:  # what the first pass would have chosen: the unsteered greedy token
            assert record.unsteered_token == first_choice and record.token == target
            assert record.mixes_on == ("push",)
    assert big.cached_ids == result.prompt_ids + result.token_ids[:-1]
    assert torch.equal(result.first_pass_topk.ids[1], result.big_topk.ids[1])
    assert not torch.equal(result.first_pass_topk.ids[2], result.big_topk.ids[2])


def test_a_post_step_judge_seeing_its_mix_on_does_not_re_run(big):
    target = big.tokenizer.encode(" la")[0]
    judges = [FunctionJudge(lambda ctx: ctx.step >= 2, mix="push", name="early"),
              FunctionJudge(lambda ctx: True, post_step=True, mix="push", name="late")]
    result = CognitiveOrchestrator(big, judges=judges, mixes={"push": pushing(big, target)}
                                   ).generate(PROMPT, max_new_tokens=6)
    assert [r.rerun for r in result.steps] == [True, True, False, False, False, False]
    assert result.token_ids == [target] * 6


def test_a_probe_judge_switches_by_its_score_with_hysteresis_and_cooldown(big, small):
    """The probe's score is the small model's residual projected on its vector (as traced);
    it turns the mix on above the threshold, off below threshold - hysteresis, and holds
    each switch for ``cooldown`` more steps."""
    unit = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(5)), dim=0)
    probe = SteeringVector({1: unit * 3.0}, small.identity, "probe")
    mixes = {"push": pushing(big, big.tokenizer.encode(" the")[0], 2.0)}
    trace = TraceConfig(small_layers=(1,))
    free = CognitiveOrchestrator(big, small).generate(PROMPT, max_new_tokens=40, trace=trace)
    threshold, hysteresis, cooldown = float((free.small_hidden[1] @ unit).median()), 0.5, 2
    judge = ProbeJudge(probe, threshold=threshold, hysteresis=hysteresis, cooldown=cooldown, mix="push")
    result = CognitiveOrchestrator(big, small, judges=judge, mixes=mixes).generate(
        PROMPT, max_new_tokens=40, trace=trace)
    scores = result.scores[judge.name]
    torch.testing.assert_close(scores, result.small_hidden[1] @ unit)
    on, hold, expected = False, 0, []
    for score in scores.tolist():
        if hold:
            hold -= 1
        elif not on and score > threshold:
            on, hold = True, cooldown
        elif on and score < threshold - hysteresis:
            on, hold = False, cooldown
        expected.append(on)
    assert [r.mixes_on == ("push",) for r in result.steps] == expected
    switches = sum(a != b for a, b in pairwise(expected))
    assert 3 <= sum(expected) <= 37 and switches >= 3  # on and off, more than once


def test_the_mirror_holds_the_big_models_context_in_its_cache(big, small):
    seen = []
    orchestrator = CognitiveOrchestrator(big, small)
    result = orchestrator.generate(PROMPT, max_new_tokens=16,
                                   on_event=lambda e: seen.append((list(orchestrator.mirror.ids),
                                                                   small.cached_ids)))
    assert all(ids == cached for ids, cached in seen)
    assert result.small_ids == small.cached_ids == result.prompt_ids + result.token_ids
    assert result.token_ids == greedy(big, result.prompt_ids, 16)
    # each step's small logits are the small model's after the big model's tokens so far
    out = small.prefill(result.prompt_ids)
    for step, token in enumerate(result.token_ids):
        assert int(result.small_topk.ids[step, 0]) == int(out.logits.argmax())
        out = small.step(token)


def test_a_mirror_of_another_vocabulary_follows_the_text(big, other):
    seen = []
    orchestrator = CognitiveOrchestrator(big, other, mirror_window=4)
    assert not orchestrator.mirror.shares_vocab and orchestrator.mirror.window == 4
    result = orchestrator.generate(PROMPT, max_new_tokens=60,
                                   on_event=lambda e: seen.append(list(orchestrator.mirror.ids)
                                                                  == other.cached_ids))
    assert all(seen) and len(seen) == 60
    expected = other.tokenizer.chat(PROMPT) + other.tokenizer.encode(result.text)
    assert result.small_ids == other.cached_ids == expected


def test_stop_strings_end_the_text_before_them(big):
    free = CognitiveOrchestrator(big).generate(PROMPT, max_new_tokens=40)
    for stop in (free.text[12:15], free.text[30:31]):  # in or across tokens, and one character
        pieces: list[str] = []
        result = CognitiveOrchestrator(big).generate(PROMPT, max_new_tokens=40, stop=[stop, "\x00"],
                                                     on_event=lambda e, pieces=pieces: pieces.append(e.text))
        assert result.finish_reason == "stop" and result.text == free.text[:free.text.index(stop)]
        assert "".join(pieces) == result.text
        assert result.token_ids == free.token_ids[:len(result.token_ids)]


def test_eos_ends_the_generation_and_is_recorded():
    ids = ScriptedEngine().tokenizer.chat(PROMPT)
    engine = ScriptedEngine(eos_at=len(ids) + 5)
    result = CognitiveOrchestrator(engine).generate(PROMPT, max_new_tokens=20)
    assert result.finish_reason == "eos" and len(result.token_ids) == 5 and len(result.steps) == 6
    assert result.steps[-1].token in engine.tokenizer.eos_ids
    assert len(CognitiveOrchestrator(engine).generate(PROMPT, max_new_tokens=20, ignore_eos=True
                                                      ).token_ids) == 20


@pytest.mark.parametrize("where", ["big", "small"])
def test_an_interrupt_keeps_the_partial_result_and_both_caches(big, small, where):
    engine = big if where == "big" else small
    calls = []

    def interrupt(ids):
        calls.append(ids)
        if len(calls) == 6:
            raise KeyboardInterrupt

    engine.before_forward = interrupt
    orchestrator = CognitiveOrchestrator(big, small)
    result = orchestrator.generate(PROMPT, max_new_tokens=20)
    assert result.finish_reason == "interrupted" and 3 <= len(result.token_ids) < 20
    assert small.cached_ids == orchestrator.mirror.ids == result.small_ids
    assert big.cached_ids == (result.prompt_ids + result.token_ids)[:big.seq_len]
    engine.before_forward = None
    again = orchestrator.generate(PROMPT, max_new_tokens=20)
    assert again.finish_reason == "length" and again.token_ids[:len(result.token_ids)] == result.token_ids


def test_a_failing_judge_raises_with_the_partial_result(big):
    def judge(ctx):
        if ctx.step == 3:
            raise ValueError("no opinion")
        return False

    with pytest.raises(JudgeError, match="judge 'opinions' failed at step 3: ValueError: no opinion") as e:
        CognitiveOrchestrator(big, judges=FunctionJudge(judge, name="opinions"),
                              mixes={"default": pushing(big, 5)}).generate(PROMPT, max_new_tokens=9)
    assert e.value.result.finish_reason == "error" and len(e.value.result.token_ids) == 3
    assert CognitiveOrchestrator(big).generate(PROMPT, max_new_tokens=9).token_ids \
        == greedy(big, big.tokenizer.chat(PROMPT), 9)


def test_overlap_gives_the_same_tokens_and_counts_its_misses(big, small):
    """Issuing each big step ahead with the last decision (the default on an engine that
    launches asynchronously, with a small model and pre-step judges): same tokens and
    records; each change of the judges' decision is one miss (rewound and run again)."""
    target = big.tokenizer.encode(" the")[0]
    on = {3, 4, 7}
    args = dict(judges=FunctionJudge(lambda ctx: ctx.step in on, mix="push", name="steps"),
                mixes={"push": pushing(big, target)})
    plain = CognitiveOrchestrator(big, small, **args)
    assert not plain.overlap  # by default only where the big engine launches asynchronously
    plain = plain.generate(PROMPT, max_new_tokens=10)
    fast = ScriptedEngine(seed=0, launches_async=True)
    overlapping = CognitiveOrchestrator(fast, small, **args)
    assert overlapping.overlap
    ahead = overlapping.generate(PROMPT, max_new_tokens=10)
    assert ahead.token_ids == plain.token_ids
    assert [r.mixes_on for r in ahead.steps] == [r.mixes_on for r in plain.steps]
    assert plain.ahead_misses == 0 and ahead.ahead_misses == 4  # steps 3, 5, 7, 8
    assert small.cached_ids == ahead.small_ids
