"""The orchestrator's overlapped schedule (big step issued ahead before the mirror's
step) gives exactly the sequential order's results, on the real embedded model (big), a
second instance of it (small) and a tiny random Llama with its own tokenizer (text mirror)."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_mirrors
from max_jupyter.orchestrator import Always, CognitiveOrchestrator, Never, ProbeJudge, TraceConfig
from max_jupyter.steering import Mix, SteeringVector

pytestmark = pytest.mark.slow  # the embedded model

PROMPT = "Write one sentence about the weather."
N = 16
TRACE = TraceConfig(big_layers=(15,), small_layers=(1,), top_k=5, full_logits=True)


@pytest.fixture()
def ctrl(engine, vector) -> Mix:
    c = Mix(engine.identity)
    c.set("happy", vector, 1.5)
    return c


def both(big, small, judges, steering, **options):
    """(sequential, overlapped) results of the same generation."""
    return tuple(CognitiveOrchestrator(big, small, judges, steering, overlap=overlap).generate(
        PROMPT, **options) for overlap in (False, True))


def assert_same(a, b) -> None:
    """Equal tokens, text, records (all but timing) and trace tensors, bit for bit."""
    assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
    fields = lambda r: [(s.step, s.token, s.sampler_prob, s.model_prob, s.mixes_on, s.rerun, s.unsteered_token,
                         s.unsteered_prob, sorted(s.scores)) for s in r.steps]
    assert fields(a) == fields(b)
    assert a.small_ids == b.small_ids
    for name, scores in a.scores.items():
        torch.testing.assert_close(scores, b.scores[name], rtol=0, atol=0, equal_nan=True)
    for x, y in ((a.big_hidden, b.big_hidden), (a.small_hidden, b.small_hidden), (a.deltas, b.deltas)):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)
    for x, y in ((a.big_topk, b.big_topk), (a.first_pass_topk, b.first_pass_topk),
                 (a.small_topk, b.small_topk), (a.big_logits, b.big_logits),
                 (a.small_logits, b.small_logits)):
        assert (x is None) == (y is None)
        if x is not None:
            assert all(torch.equal(u, v) for u, v in zip(x, y)) if isinstance(x, tuple) else torch.equal(x, y)


def test_overlap_is_automatic_only_where_it_pays(engine, small, vector, monkeypatch):
    probe = ProbeJudge(SteeringVector({15: vector.directions[15]}, small.identity, "p"))
    assert not CognitiveOrchestrator(engine, small, probe, vector).overlap  # CPU: synchronous
    monkeypatch.setattr(engine, "launches_async", True, raising=False)
    assert CognitiveOrchestrator(engine, small, probe, vector).overlap
    assert not CognitiveOrchestrator(engine, None, Always(), vector).overlap  # nothing to overlap
    assert not CognitiveOrchestrator(engine, small, None).overlap
    assert not CognitiveOrchestrator(engine, small, probe, vector, overlap=False).overlap


def test_probe_judge_switching_overlap_equals_sequential(engine, small, ctrl, vector):
    probe_vec = SteeringVector({15: vector.directions[15]}, small.identity, "happy-probe")
    scout = CognitiveOrchestrator(engine, small, ProbeJudge(probe_vec, threshold=torch.inf, name="p"),
                                  ctrl).generate(PROMPT, max_new_tokens=N)
    judge = ProbeJudge(probe_vec, threshold=float(scout.scores["p"].median()), name="p")
    seq, ovl = both(engine, small, judge, ctrl, max_new_tokens=N, trace=TRACE)
    assert_same(seq, ovl)
    flips = sum(a != b for a, b in zip(ovl.steered.tolist(), ovl.steered.tolist()[1:]))
    assert flips >= 2 and ovl.ahead_misses == flips and seq.ahead_misses == 0
    assert not ovl.reruns.any()  # a ahead miss is no re-run
    assert ovl.small_ids == ovl.prompt_ids + ovl.token_ids
    assert engine.seq_len == len(ovl.prompt_ids) + len(ovl.steps) - 1  # nothing issued past the end
    assert_mirrors(small, ovl.small_ids)


@pytest.mark.parametrize("steer_prompt", [True, False])
def test_always_overlap_equals_sequential(engine, small, ctrl, steer_prompt):
    seq, ovl = both(engine, small, Always(), ctrl, max_new_tokens=12, steer_prompt=steer_prompt,
                    trace=TRACE)
    assert_same(seq, ovl)
    assert ovl.ahead_misses == 0  # the unmasked decision of step 0 is issued ahead
    assert_mirrors(small, ovl.small_ids)


def test_never_text_mirror_and_stop_string_overlap_equals_sequential(engine, tiny):
    free = CognitiveOrchestrator(engine, tiny, Never(), overlap=True).generate(PROMPT, max_new_tokens=N)
    stop = " " + free.text.split()[4]
    seq, ovl = both(engine, tiny, Never(), None, max_new_tokens=N, stop=[stop], trace=TRACE)
    assert_same(seq, ovl)
    assert ovl.finish_reason == "stop" and ovl.ahead_misses == 0
    text = engine.tokenizer.decode(ovl.token_ids)  # the stop string too: the mirror saw it
    assert ovl.small_ids == tiny.tokenizer.chat(PROMPT) + tiny.tokenizer.encode(text)
    assert_mirrors(tiny, ovl.small_ids)


def test_mix_change_and_interrupt_with_overlap(engine, small, ctrl):
    def change_at_3(ev):
        if ev.record is not None and ev.record.step == 3:
            ctrl.set_coef("happy", -1.0)  # after step 4's forward was issued ahead

    results = []
    for overlap in (False, True):
        ctrl.set_coef("happy", 1.5)
        o = CognitiveOrchestrator(engine, small, Always(), ctrl, overlap=overlap)
        results.append(o.generate(PROMPT, max_new_tokens=8, on_event=change_at_3, trace=TRACE))
    assert_same(*results)
    assert results[1].ahead_misses == 1  # the changed mix, not the judge

    def interrupt_at_3(ev):
        if ev.record is not None and ev.record.step == 3:
            raise KeyboardInterrupt

    o = CognitiveOrchestrator(engine, small, Always(), ctrl, overlap=True)
    r = o.generate(PROMPT, max_new_tokens=8, on_event=interrupt_at_3)
    assert r.finish_reason == "interrupted" and len(r.token_ids) == 4
    assert r.small_ids == r.prompt_ids + r.token_ids
    assert_mirrors(small, r.small_ids)
