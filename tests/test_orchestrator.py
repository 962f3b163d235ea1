"""The cognitive orchestrator on the real embedded model (big), a second instance of it
(small, same vocabulary) and a tiny random Llama with its own tokenizer (small, text mirror)."""
from __future__ import annotations

import copy
import math
import threading

import pytest
import torch

from conftest import assert_mirrors
from max_jupyter.orchestrator import (
    Always,
    CognitiveOrchestrator,
    ContextMirror,
    DivergenceJudge,
    FunctionJudge,
    JudgeContext,
    JudgeError,
    MirrorError,
    Never,
    ProbeJudge,
    SamplingConfig,
    TraceConfig,
    Verdict,
    plain,
)
from max_jupyter.orchestrator.mirror import window_safe
from max_jupyter.steering import Mix, ModelMismatchError, SteeringVector

pytestmark = pytest.mark.slow  # the embedded model and small models

PROMPT = "Write one sentence about the weather."
N = 12
LAYERS = (10, 15)  # the layers of the conftest ``vector``


@pytest.fixture(scope="module")
def big(engine):
    return engine


@pytest.fixture()
def ctrl(big, vector) -> Mix:
    c = Mix(big.identity)
    c.set("happy", vector, 0.6)
    return c


@pytest.fixture(scope="module")
def baseline(big):
    """The big model alone, greedy, unsteered."""
    return plain.generate(big, PROMPT, max_new_tokens=N)


# ---------------------------------------------------------------- baselines


def test_never_equals_big_alone(big, small, ctrl, baseline):
    alone = CognitiveOrchestrator(big, None, Never(), mixes=ctrl)
    assert alone.mirror is None
    r = alone.generate(PROMPT, max_new_tokens=N)
    assert r.token_ids == baseline.token_ids and r.text == baseline.text
    assert r.finish_reason == baseline.finish_reason
    assert r.small_ids is None and r.small_topk is None
    mirrored = CognitiveOrchestrator(big, small, Never(), mixes=ctrl).generate(
        PROMPT, max_new_tokens=N)
    assert mirrored.token_ids == baseline.token_ids
    assert not mirrored.steered.any() and mirrored.deltas == {}


@pytest.mark.parametrize("steer_prompt", [True, False])
def test_always_equals_steered_throughout(big, ctrl, baseline, steer_prompt):
    expected = plain.generate(big, PROMPT, max_new_tokens=N, steering=ctrl, steer_prompt=steer_prompt)
    assert expected.token_ids != baseline.token_ids  # the mix does something
    r = CognitiveOrchestrator(big, None, Always(), mixes=ctrl).generate(
        PROMPT, max_new_tokens=N, steer_prompt=steer_prompt)
    assert r.token_ids == expected.token_ids and r.text == expected.text
    steered = [bool(s.mixes_on) for s in r.steps]
    assert steered == [steer_prompt] + [True] * (len(r.steps) - 1)
    want = ctrl.deltas(big)
    for layer in LAYERS:
        assert r.deltas[layer].shape == (len(r.steps), big.identity.hidden_size)
        torch.testing.assert_close(r.deltas[layer][1], want[layer])
        assert bool(r.deltas[layer][0].any()) == steer_prompt


# ---------------------------------------------------------------- post-step re-run


def test_post_step_rerun_keeps_both_and_matches_fresh_forward(big, small, ctrl, baseline):
    ctrl.set_coef("happy", 2.5)
    at = 3
    judge = FunctionJudge(lambda ctx: ctx.step == at, post_step=True, name="at3")
    r = CognitiveOrchestrator(big, small, judge, mixes=ctrl).generate(
        PROMPT, max_new_tokens=N, trace=TraceConfig(full_logits=True))
    reruns = [s.step for s in r.steps if s.rerun]
    assert reruns == [at]
    rec = r.steps[at]
    assert rec.mixes_on == ("default",) and rec.changed
    assert rec.unsteered_token == baseline.token_ids[at]  # the first pass = the unsteered model
    assert r.token_ids[:at] == baseline.token_ids[:at] and r.token_ids[at] == rec.token
    assert int(r.first_pass_topk.ids[at, 0]) == rec.unsteered_token
    assert int(r.big_topk.ids[at, 0]) == rec.token
    # The final logits of the re-run step equal a fresh forward steered at that position.
    ids = r.prompt_ids + r.token_ids[: at - 1]
    big.prefill(ids)
    fresh = big.step(r.token_ids[at - 1], ctrl.deltas(big)).logits
    torch.testing.assert_close(r.big_logits[at], fresh, atol=2e-4, rtol=1e-4)
    # Steps after it are unsteered forwards over the changed context.
    assert not r.steered[at + 1:].any() and r.steered[at]


def test_divergence_judges(big, small, ctrl):
    kl = DivergenceJudge(1e-3, "kl", name="kl")
    r = CognitiveOrchestrator(big, small, kl, mixes=ctrl).generate(PROMPT, max_new_tokens=6)
    assert r.scores["kl"].abs().max() < 1e-4  # the same model on the same context: no divergence
    assert not r.reruns.any()
    ent = DivergenceJudge(3.0, "entropy", name="entropy")
    r = CognitiveOrchestrator(big, None, ent, mixes=ctrl).generate(
        PROMPT, max_new_tokens=8, trace=TraceConfig(full_logits=True))
    fired = r.scores["entropy"] > 3.0
    assert fired.any() and not fired.all()
    assert r.reruns.tolist() == fired.tolist() == r.steered.tolist()
    for s, rerun in zip(r.steps, fired.tolist()):
        assert (s.unsteered_token is not None) == rerun
        first = r.first_pass_topk.logits[s.step]
        assert torch.equal(first, r.big_topk.logits[s.step]) != rerun  # both versions kept


def test_judges_compose_over_named_mixes(big, ctrl, vector):
    calm = Mix.of(vector.select([15]), -0.5)  # a fixed vector is a mix too
    even = FunctionJudge(lambda ctx: ctx.step % 2 == 0, mix="calm", name="even")
    r = CognitiveOrchestrator(big, None, [Always("happy"), even],
                              mixes={"happy": ctrl, "calm": calm}).generate(PROMPT, max_new_tokens=6)
    assert [s.mixes_on for s in r.steps] == [("calm", "happy") if t % 2 == 0 else ("happy",)
                                             for t in range(len(r.steps))]
    happy, calm15 = ctrl.deltas(big), calm.deltas(big)[15]
    for t in range(len(r.steps)):
        torch.testing.assert_close(r.deltas[15][t], happy[15] + calm15 * (t % 2 == 0))
        torch.testing.assert_close(r.deltas[10][t], happy[10])


# ---------------------------------------------------------------- ProbeJudge


def scripted_ctx(step: int, projection: float, unit: torch.Tensor) -> JudgeContext:
    return JudgeContext(step, [], {7: projection * unit}, None)


def test_probe_judge_threshold_hysteresis_cooldown(small):
    direction = torch.randn(small.identity.hidden_size)
    vec = SteeringVector({7: 3.0 * direction}, small.identity, "probe")
    unit = direction / direction.norm()
    script = [0.0, 0.5, 1.2, 1.1, 0.9, 0.7, 0.5, 1.3, 0.2, 2.0, 0.0, 0.0]

    def run(judge):
        out = [judge.decide(scripted_ctx(t, p, unit)) for t, p in enumerate(script)]
        for v, p in zip(out, script):
            assert math.isclose(v.score, p, abs_tol=1e-4)
        return [bool(v.turn_on) for v in out]

    plain_judge = ProbeJudge(vec, threshold=1.0)
    assert run(plain_judge) == [p > 1.0 for p in script]
    hyst = ProbeJudge(vec, threshold=1.0, hysteresis=0.4)  # off below 0.6
    assert run(hyst) == [False, False, True, True, True, True, False, True, False, True, False, False]
    cool = ProbeJudge(vec, threshold=1.0, cooldown=2)  # a switch holds 2 more steps
    assert run(cool) == [False, False, True, True, True, False, False, False, False, True, True, True]
    assert run(cool) == run(ProbeJudge(vec, threshold=1.0, cooldown=2))  # step 0 resets state


def test_probe_judge_fires_where_projection_crosses(big, small, ctrl, vector):
    probe_vec = SteeringVector({15: vector.directions[15]}, small.identity, "happy-probe")
    scout = ProbeJudge(probe_vec, threshold=math.inf, name="probe")
    r0 = CognitiveOrchestrator(big, small, scout, mixes=ctrl).generate(PROMPT, max_new_tokens=N)
    threshold = float(r0.scores["probe"].median())
    judge = ProbeJudge(probe_vec, threshold=threshold, hysteresis=0.0, name="probe")
    r = CognitiveOrchestrator(big, small, judge, mixes=ctrl).generate(
        PROMPT, max_new_tokens=N, trace=TraceConfig(small_layers=(15,)))
    scores = r.scores["probe"]
    unit = probe_vec.directions[15] / probe_vec.directions[15].norm()
    torch.testing.assert_close(scores, r.small_hidden[15] @ unit, atol=1e-3, rtol=1e-5)
    crossed = (scores > threshold).tolist()
    assert any(crossed) and not all(crossed)
    assert r.steered.tolist() == crossed
    assert (r.deltas[15].abs().sum(-1) > 0).tolist() == crossed


# ---------------------------------------------------------------- ContextMirror


def test_mirror_same_vocabulary_equals_fresh_prefill(big, small, baseline):
    o = CognitiveOrchestrator(big, small, Never())
    assert o.mirror.shares_vocab
    r = o.generate(PROMPT, max_new_tokens=N, trace=TraceConfig(small_layers=(3,), big_layers=(3,)))
    assert r.small_ids == r.prompt_ids + r.token_ids
    # Same weights, same context: the small model's trace equals the big model's.
    torch.testing.assert_close(r.small_hidden[3], r.big_hidden[3], atol=1e-3, rtol=1e-4)
    assert torch.equal(r.small_topk.ids[:, 0], r.big_topk.ids[:, 0])
    assert_mirrors(small, r.small_ids)


def test_mirror_different_tokenizer_equals_fresh_prefill(big, tiny, monkeypatch):
    rewinds = []
    monkeypatch.setattr(tiny, "rewind", lambda n, real=tiny.rewind: (rewinds.append(n), real(n)))
    o = CognitiveOrchestrator(big, tiny, Never())
    assert not o.mirror.shares_vocab and o.mirror.window > 0
    r = o.generate(PROMPT, max_new_tokens=24, trace=TraceConfig(small_layers=(1,)))
    expected = tiny.tokenizer.chat(PROMPT) + tiny.tokenizer.encode(big.tokenizer.decode(r.token_ids))
    assert r.small_ids == expected
    assert len(expected) > len(tiny.tokenizer.chat(PROMPT)) + len(r.token_ids)  # finer tokens
    assert rewinds  # some pieces ended mid-word and were re-tokenised
    assert r.small_hidden[1].shape == (len(r.steps), 64)
    monkeypatch.undo()
    assert_mirrors(tiny, r.small_ids)


def test_mirror_text_mode_mid_character_and_window(big, tiny):
    assert window_safe(tiny.tokenizer)
    mirror = ContextMirror(big, tiny)
    text = ("naïve café résumé 日本語 🙂 ok, then a longer sentence with many words that moves "
            "the re-tokenising window forward several times.")
    mirror.start(PROMPT, big.tokenizer.chat(PROMPT), capture=(0,))
    prompt = list(mirror.ids)
    ran = []
    for token in big.tokenizer.encode(text):
        ran.append(mirror.feed(token))
        assert mirror.ids == prompt + tiny.tokenizer.encode(mirror.text)  # exact at every step
        assert tiny.seq_len == len(mirror.ids) and mirror.hidden[0].shape == (64,)
    assert not all(ran)  # tokens ending inside a character waited for the next one
    mirror.finish()
    assert mirror.text == text
    assert_mirrors(tiny, mirror.ids)


# ---------------------------------------------------------------- determinism, threads, events


def test_determinism_with_seed(big, small, ctrl):
    sampling = SamplingConfig(temperature=0.9, top_k=50, seed=1234)
    o = CognitiveOrchestrator(big, small, DivergenceJudge(2.0, name="ent"), mixes=ctrl)
    a = o.generate(PROMPT, max_new_tokens=10, sampling=sampling)
    b = o.generate(PROMPT, max_new_tokens=10, sampling=sampling)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert [(s.token, s.rerun, s.unsteered_token, s.mixes_on) for s in a.steps] == \
           [(s.token, s.rerun, s.unsteered_token, s.mixes_on) for s in b.steps]
    torch.testing.assert_close(a.scores["ent"], b.scores["ent"])


def test_mix_change_applies_at_next_step(big, ctrl, vector):
    o = CognitiveOrchestrator(big, None, Always(), mixes=ctrl)

    def on_event(ev):
        if ev.record is not None and ev.record.step == 3:
            ctrl.set_coef("happy", -0.4)

    r = o.generate(PROMPT, max_new_tokens=8, on_event=on_event)
    coefs = [0.6] * 4 + [-0.4] * (len(r.steps) - 4)
    one = vector.deltas(1.0, big.residual_norms)  # what coefficient 1 adds
    for layer in LAYERS:
        want = torch.stack([c * one[layer] for c in coefs])  # [steps, hidden]
        torch.testing.assert_close(r.deltas[layer], want)


def test_mix_change_from_another_thread_is_race_free(big, ctrl, vector):
    stop = threading.Event()

    def slider():
        k = 0
        while not stop.is_set():
            ctrl.set_coef("happy", float(k % 5))
            k += 1

    ctrl.set_coef("happy", 0.0)
    thread = threading.Thread(target=slider)
    thread.start()
    try:
        r = CognitiveOrchestrator(big, None, Always(), mixes=ctrl).generate(PROMPT, max_new_tokens=8)
    finally:
        stop.set()
        thread.join()
    one = vector.deltas(1.0, big.residual_norms)  # what coefficient 1 adds
    d10, d15 = one[10], one[15]
    for row10, row15 in zip(r.deltas[10], r.deltas[15]):
        coef = round(float(row10 @ d10 / (d10 @ d10)))
        assert coef in range(5)
        torch.testing.assert_close(row10, coef * d10)
        torch.testing.assert_close(row15, coef * d15)  # both layers from one snapshot


def test_stream_events_stop_strings_and_trace(big, small, baseline):
    stop = " " + baseline.text.split()[4]
    expected = plain.generate(big, PROMPT, max_new_tokens=N, stop=[stop])
    seen = []
    o = CognitiveOrchestrator(big, small, Never())
    events = o.stream(PROMPT, max_new_tokens=N, stop=[stop], on_event=seen.append,
                      trace=TraceConfig(big_layers=(0, 29), top_k=5))
    streamed = []
    while True:
        try:
            streamed.append(next(events))
        except StopIteration as done:
            r = done.value
            break
    assert streamed == seen
    assert r.finish_reason == expected.finish_reason == "stop" and r.text == expected.text
    assert "".join(e.text for e in streamed) == r.text
    assert [e.record.step for e in streamed if e.record] == list(range(len(r.steps)))
    n = len(r.steps)
    assert r.big_hidden[29].shape == (n, 576) and r.big_topk.ids.shape == (n, 5)
    assert r.small_topk.logits.shape == (n, 5) and r.big_logits is None
    for t in (*r.big_hidden.values(), *r.big_topk, *r.small_topk):
        assert t.device.type == "cpu" and not t.requires_grad
    row0 = big.prefill(r.prompt_ids, capture=(29,)).hidden[29][-1]
    torch.testing.assert_close(r.big_hidden[29][0], row0)


# ---------------------------------------------------------------- failures


def test_judge_error_names_judge_and_step_and_keeps_partial_trace(big, small, ctrl, baseline):
    def flaky(ctx):
        if ctx.step == 4:
            raise RuntimeError("boom")
        return False

    o = CognitiveOrchestrator(big, small, FunctionJudge(flaky, name="flaky"), mixes=ctrl)
    with pytest.raises(JudgeError, match=r"judge 'flaky' failed at step 4: RuntimeError: boom") as err:
        o.generate(PROMPT, max_new_tokens=N)
    partial = err.value.result
    assert err.value.judge == "flaky" and err.value.step == 4
    assert partial.finish_reason == "error" and len(partial.steps) == 4
    assert partial.token_ids == baseline.token_ids[:4]
    assert small.seq_len == len(partial.small_ids) == len(partial.prompt_ids) + 4
    again = CognitiveOrchestrator(big, small, Never()).generate(PROMPT, max_new_tokens=N)
    assert again.token_ids == baseline.token_ids


def test_keyboard_interrupt_gives_partial_result_and_consistent_caches(big, tiny, baseline):
    o = CognitiveOrchestrator(big, tiny, Never())

    def on_event(ev):
        if ev.record is not None and ev.record.step == 3:
            raise KeyboardInterrupt

    r = o.generate(PROMPT, max_new_tokens=N, on_event=on_event)
    assert r.finish_reason == "interrupted" and r.token_ids == baseline.token_ids[:4]
    assert tiny.seq_len == len(r.small_ids)
    # Interrupt inside the small model's forward, in the middle of mirroring.
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt

    handle = tiny.model.model.layers[0].register_forward_hook(hook)
    try:
        r = o.generate(PROMPT, max_new_tokens=N)
    finally:
        handle.remove()
    assert r.finish_reason == "interrupted" and 0 < len(r.token_ids) < N
    assert tiny.seq_len == len(o.mirror.ids) == len(r.small_ids)
    assert_mirrors(tiny, list(o.mirror.ids))
    # The next run equals a fresh one.
    r = o.generate(PROMPT, max_new_tokens=N)
    assert r.token_ids == baseline.token_ids
    assert r.small_ids == tiny.tokenizer.chat(PROMPT) + tiny.tokenizer.encode(r.text)


def test_abort_stops_before_next_step(big):
    o = CognitiveOrchestrator(big)
    r = o.generate(PROMPT, max_new_tokens=N,
                   on_event=lambda ev: ev.record and ev.record.step == 2 and o.abort())
    assert r.finish_reason == "aborted" and len(r.steps) == 3
    assert len(o.generate(PROMPT, max_new_tokens=2).token_ids) == 2  # the next run is not aborted


def test_bad_input(big, small, tiny, vector, ctrl):
    blind = copy.copy(tiny)
    blind.tokenizer = None
    with pytest.raises(MirrorError, match="different vocabularies.*no tokenizer"):
        CognitiveOrchestrator(big, blind)
    with pytest.raises(ModelMismatchError, match=r"that is the big model.*train its vector on"):
        CognitiveOrchestrator(big, tiny, ProbeJudge(vector.select([10])), mixes=ctrl)
    with pytest.raises(ValueError, match="different vocabularies"):
        CognitiveOrchestrator(big, tiny, DivergenceJudge(1.0, "kl"), mixes=ctrl)
    with pytest.raises(ValueError, match="has none"):
        CognitiveOrchestrator(big, None, ProbeJudge(vector.select([10])), mixes=ctrl)
    with pytest.raises(KeyError, match="'calm'"):
        CognitiveOrchestrator(big, None, Always("calm"), mixes=ctrl)
    with pytest.raises(ValueError, match="separate engine"):
        CognitiveOrchestrator(big, big)
    with pytest.raises(ValueError, match="unique"):
        CognitiveOrchestrator(big, None, [Never(), Never()])
    with pytest.raises(ModelMismatchError):
        CognitiveOrchestrator(tiny, None, Always(), mixes=ctrl)  # mix for another model
    rogue = FunctionJudge(lambda ctx: Verdict(1.0, frozenset({"x"})), name="rogue")
    bad = CognitiveOrchestrator(big, None, rogue, mixes=ctrl)
    with pytest.raises(JudgeError, match="rogue.*step 0"):
        bad.generate(PROMPT, max_new_tokens=2)


def test_ignore_eos_runs_to_max_tokens_like_the_plain_loop(big):
    prompt = "Say hello in one short sentence."
    stopped = CognitiveOrchestrator(big).generate(prompt, max_new_tokens=40)
    assert stopped.finish_reason == "eos"
    n = len(stopped.token_ids) + 3
    past = CognitiveOrchestrator(big).generate(prompt, max_new_tokens=n, ignore_eos=True)
    assert past.finish_reason == "length" and len(past.token_ids) == n
    assert past.token_ids == plain.generate(big, prompt, max_new_tokens=n, ignore_eos=True).token_ids


def test_post_step_rerun_at_step_0_steers_the_whole_prompt(big, ctrl):
    first = FunctionJudge(lambda ctx: ctx.step == 0, post_step=True, name="first")
    r = CognitiveOrchestrator(big, None, first, mixes=ctrl).generate(
        PROMPT, max_new_tokens=2, trace=TraceConfig(full_logits=True))
    assert [s.rerun for s in r.steps] == [True, False]
    steered_prompt = big.prefill(r.prompt_ids, ctrl.deltas(big)).logits
    torch.testing.assert_close(r.big_logits[0], steered_prompt, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- old names


def test_old_names_warn_and_still_work(big, ctrl):
    """Each renamed public name (docs/design.md, "Vocabulary") still works and warns."""
    import importlib
    import sys

    import max_jupyter.steering as steering_pkg

    with pytest.warns(DeprecationWarning, match="SteeringController"):
        assert steering_pkg.SteeringController is Mix
    sys.modules.pop("max_jupyter.steering.controller", None)
    with pytest.warns(DeprecationWarning, match="steering.mix"):
        assert importlib.import_module("max_jupyter.steering.controller").SteeringController is Mix

    with pytest.warns(DeprecationWarning, match="turn_on"):
        verdict = Verdict(1.0, steer=frozenset({"default"}))
    assert verdict.turn_on == {"default"}
    with pytest.warns(DeprecationWarning, match="turn_on"):
        assert verdict.steer == {"default"}
    with pytest.warns(DeprecationWarning, match="turns_on"):
        class OldJudge(Never):
            mixes = ("default",)
    assert OldJudge().turns_on == ("default",)
    with pytest.warns(DeprecationWarning, match="turns_on"):
        assert Always().mixes == ("default",)

    with pytest.warns(DeprecationWarning, match="steering="):
        old_live = CognitiveOrchestrator(big, mix=ctrl)
    assert old_live.resolver.always == [ctrl] and not old_live.resolver.named
    with pytest.warns(DeprecationWarning, match="mixes="):
        old_gated = CognitiveOrchestrator(big, None, Always(), steering=ctrl)
    assert old_gated.resolver.named == {"default": ctrl} and not old_gated.resolver.always
    r = old_gated.generate(PROMPT, max_new_tokens=2)
    with pytest.warns(DeprecationWarning, match="mixes_on"):
        assert r.steps[0].steering == ("default",) == r.steps[0].mixes_on
    with pytest.warns(DeprecationWarning, match="live_coefs"):
        assert r.steps[0].mix == {} == r.steps[0].live_coefs
    with pytest.warns(DeprecationWarning, match="ahead_misses"):
        assert r.speculation_misses == 0 == r.ahead_misses
    with pytest.warns(DeprecationWarning, match="sampler_prob"):
        assert r.steps[0].prob == 1.0 == r.steps[0].sampler_prob
    with pytest.warns(DeprecationWarning, match="sampler_probs"):
        assert torch.equal(r.probs, r.sampler_probs)


def test_steering_always_on_beside_gated_mixes(big, vector):
    """``steering=`` applies at every step; ``mixes=`` only where a judge turns one on,
    and without judges that turn mixes on, ``steering=`` raises no warning."""
    import warnings

    live = Mix.of(vector, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        r = CognitiveOrchestrator(big, None, Never(), mixes={"joy": Mix.of(vector)},
                                  steering=live).generate(PROMPT, max_new_tokens=3)
    assert all(s.steered and s.mixes_on == () for s in r.steps)
    assert r.token_ids == plain.generate(big, PROMPT, max_new_tokens=3, steering=live).token_ids


def test_model_prob_is_the_softmax_of_the_raw_logits(big, ctrl):
    """``model_prob``: the model's probability of the chosen token (softmax of the step's
    recorded logits at temperature 1); ``sampler_prob``: the sampler's (1.0 under greedy)."""
    r = CognitiveOrchestrator(big, None, Always(), mixes=ctrl).generate(
        PROMPT, max_new_tokens=N, trace=TraceConfig(full_logits=True))
    # in float64: torch's float32 CPU softmax is off by up to ~2e-5 relative
    want = torch.softmax(r.big_logits.double(), -1)[torch.arange(len(r.steps)), [s.token for s in r.steps]]
    torch.testing.assert_close(r.model_probs, want.float(), rtol=1e-5, atol=1e-7)
    assert (r.sampler_probs == 1.0).all() and (r.model_probs < 0.99).any()
