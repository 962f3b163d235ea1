"""Greedy speculative decoding on the CPU: the embedded model verifies drafts from a second
instance of itself (acceptance 1), from a copy with a little weight noise (partial
acceptance) and from one with as much noise as weight (a bad drafter: falls back to plain)."""
from __future__ import annotations

import pytest
import torch

from max_jupyter.engines import TransformersEngine
from max_jupyter.errors import BackendUnavailableError, BadArgumentError
from max_jupyter.orchestrator import CognitiveOrchestrator, Never, SamplingConfig, TraceConfig
from max_jupyter.steering import SteeringController
from conftest import assert_mirrors

PROMPT = "Write one sentence about the weather."
LAYERS = (10, 15)  # the layers of the conftest ``vector``


def noised(sigma: float) -> TransformersEngine:
    """The embedded model with Gaussian noise of ``sigma`` times each weight's std added."""
    model = TransformersEngine.load(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * sigma)
    return model


@pytest.fixture(scope="module")
def near(engine) -> TransformersEngine:
    return noised(0.05)


@pytest.fixture(scope="module")
def bad(engine) -> TransformersEngine:
    return noised(1.0)


@pytest.fixture()
def ctrl(engine, vector) -> SteeringController:
    c = SteeringController(engine.identity)
    c.set("happy", vector, 1.5)
    return c


def pair(orch: CognitiveOrchestrator, speculate: int, **options):
    """The same generation without and with speculation, and the caches each left:
    (result, big seq_len, small seq_len) twice."""
    runs = []
    for k in (0, speculate):
        r = orch.generate(PROMPT, speculate=k, **options)
        runs.append((r, orch.big.seq_len, orch.small.seq_len))
    return runs


def assert_same(plain, spec) -> None:
    """Same tokens, text, ending, trace and caches as the non-speculative run."""
    (a, big_a, small_a), (b, big_b, small_b) = plain, spec
    assert b.token_ids == a.token_ids and b.text == a.text
    assert b.finish_reason == a.finish_reason
    assert b.small_ids == a.small_ids and (big_b, small_b) == (big_a, small_a)
    assert [r.token for r in b.steps] == [r.token for r in a.steps]
    assert [r.steered for r in b.steps] == [r.steered for r in a.steps]
    assert [r.mix for r in b.steps] == [r.mix for r in a.steps]
    assert torch.equal(b.big_topk.ids[:, 0], a.big_topk.ids[:, 0])
    torch.testing.assert_close(b.big_topk.logits, a.big_topk.logits, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(b.small_topk.logits, a.small_topk.logits, atol=1e-3, rtol=1e-4)
    for layer, rows in a.big_hidden.items():
        torch.testing.assert_close(b.big_hidden[layer], rows, atol=1e-3, rtol=1e-4)
    assert a.drafted_tokens == 0 and a.acceptance_rate is None and b.speculate_off is None


def assert_caches(orch: CognitiveOrchestrator, r, small: bool = True, big: bool = True) -> None:
    """The caches hold what the result says they saw (checked against fresh prefills; a
    steered cache has none to compare with)."""
    if small:
        assert_mirrors(orch.small, r.small_ids)
    if big:
        assert_mirrors(orch.big, (r.prompt_ids + r.token_ids)[:orch.big.seq_len])


def block_of(r, step: int) -> tuple[int, int] | None:
    """(first step, accepted) of the speculative block that handed out ``step``, if any."""
    for s in r.steps:
        if s.drafted and s.step <= step <= s.step + s.accepted:
            return s.step, s.accepted
    return None


# ---------------------------------------------------------------- the engine's verify


def test_verify_rows_equal_per_token_steps(engine, ctrl):
    ids = engine.tokenizer.chat(PROMPT)
    draft = engine.tokenizer.encode(" It is sunny today")[:4]
    deltas = ctrl.deltas(engine)
    engine.prefill(ids)
    out = engine.verify(draft, deltas, capture=LAYERS)
    assert engine.seq_len == len(ids) + len(draft)
    assert out.all_logits.shape == (len(draft), engine.identity.vocab_size)
    assert torch.equal(out.logits, out.all_logits[-1])
    engine.rewind(len(draft))
    for j, token in enumerate(draft):
        step = engine.step(token, deltas, capture=LAYERS)
        torch.testing.assert_close(out.all_logits[j], step.logits, atol=1e-4, rtol=1e-4)
        for layer in LAYERS:
            torch.testing.assert_close(out.hidden[layer][j], step.hidden[layer][0], atol=1e-4, rtol=1e-4)
    assert engine.seq_len == len(ids) + len(draft)  # steered positions: no unsteered prefill to compare


def test_verify_refused_without_support(engine, monkeypatch):
    engine.prefill([1, 2, 3])
    monkeypatch.setattr(engine, "supports_verify", False)
    with pytest.raises(BackendUnavailableError, match="speculate=0"):
        engine.verify([4, 5])
    assert engine.seq_len == 3


# ---------------------------------------------------------------- greedy identity


@pytest.mark.parametrize("steered", [False, True])
def test_self_draft_equals_greedy(engine, small, ctrl, steered):
    orch = CognitiveOrchestrator(engine, small, mix=ctrl if steered else None)
    trace = TraceConfig(big_layers=LAYERS, small_layers=(5,))
    plain, spec = pair(orch, 4, max_new_tokens=10, ignore_eos=True, trace=trace)
    assert_same(plain, spec)
    r = spec[0]
    if steered:  # the drafter is not steered: it disagrees somewhere, the output does not
        assert r.acceptance_rate < 1 and any(s.rejected for s in r.steps)
    else:  # blocks at steps 1 (4 drafted) and 6 (3: up to the last step)
        assert r.acceptance_rate == 1.0 and r.drafted_tokens == 7
        assert r.steps[1].drafted == tuple(r.token_ids[1:5]) and r.steps[1].accepted == 4
    assert all(s.steered for s in r.steps) == steered
    assert_caches(orch, r, big=not steered)


def test_noised_drafter_partial_acceptance_equals_greedy(engine, near):
    orch = CognitiveOrchestrator(engine, near)
    plain, spec = pair(orch, 4, max_new_tokens=16, ignore_eos=True)
    assert_same(plain, spec)
    r = spec[0]
    assert 0 < r.acceptance_rate < 1
    rejected = [s for s in r.steps if s.rejected]
    assert rejected, "the noised copy should disagree somewhere"
    for s in rejected:  # the big model's own token follows the accepted prefix
        assert r.steps[s.step + s.accepted].token != s.rejected[0]
    assert_caches(orch, r)


@pytest.mark.parametrize("end", ["eos", "stop", "aborted"])
def test_ending_inside_a_block_leaves_the_caches_of_greedy(engine, small, end):
    orch = CognitiveOrchestrator(engine, small)
    options = {"max_new_tokens": 30, "stop": ["."] if end == "stop" else ()}
    if end == "aborted":
        options["on_event"] = lambda e: e.record and e.record.step == 10 and orch.abort()
    plain, spec = pair(orch, 6, **options)
    assert_same(plain, spec)
    r = spec[0]
    assert r.finish_reason == end
    first, accepted = block_of(r, r.steps[-1].step)
    assert r.steps[-1].step < first + accepted, "the generation should end inside a block"
    assert_caches(orch, r)


# ---------------------------------------------------------------- adaptive draft length


def test_bad_drafter_falls_back_to_plain_steps(engine, bad):
    orch = CognitiveOrchestrator(engine, bad)
    before = bad.forward_calls
    plain = orch.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    plain_calls, before = bad.forward_calls - before, bad.forward_calls
    r = orch.generate(PROMPT, max_new_tokens=16, ignore_eos=True, speculate=4)
    assert r.token_ids == plain.token_ids and r.small_ids == plain.small_ids
    lengths = [len(s.drafted) for s in r.steps if s.drafted]
    assert lengths[:4] == [4, 3, 2, 1] and r.acceptance_rate < 0.2
    in_blocks = sum(1 for s in r.steps if block_of(r, s.step))
    assert len(r.steps) - in_blocks >= 6  # mostly plain steps once k fell to 0
    assert bad.forward_calls - before <= plain_calls + 8  # the drafts wasted a few forwards
    assert_caches(orch, r, small=False)  # its noisy activations exceed the prefill tolerance


# ---------------------------------------------------------------- refused or off


def test_speculate_refused_with_sampling_or_out_of_range(engine, small):
    orch = CognitiveOrchestrator(engine, small)
    with pytest.raises(BadArgumentError, match="speculative sampling is not supported"):
        orch.prepare(PROMPT, speculate=4, sampling=SamplingConfig(temperature=0.7))
    for value in (-1, 17, 1.5, True):
        with pytest.raises(BadArgumentError, match="speculate"):
            orch.prepare(PROMPT, speculate=value)


def test_speculate_off_where_it_cannot_draft(engine, small, tiny, monkeypatch):
    cases = {"no small model": CognitiveOrchestrator(engine),
             "vocabulary differs": CognitiveOrchestrator(engine, tiny),
             "judges are on": CognitiveOrchestrator(engine, small, Never())}
    for reason, orch in cases.items():
        r = orch.generate(PROMPT, max_new_tokens=3, speculate=4)
        assert reason in r.speculate_off and r.drafted_tokens == 0
    monkeypatch.setattr(engine, "supports_verify", False)
    r = CognitiveOrchestrator(engine, small).generate(PROMPT, max_new_tokens=3, speculate=4)
    assert "no verify forward" in r.speculate_off and r.drafted_tokens == 0


def test_the_session_passes_speculate_through(engine, small):
    from max_jupyter import Session

    with Session(engine, small) as s:
        plain = s.generate("Name three colours.", max_new_tokens=12)
        fast = s.generate("Name three colours.", max_new_tokens=12, speculate=4)
    assert fast.token_ids == plain.token_ids and fast.drafted_tokens > 0
