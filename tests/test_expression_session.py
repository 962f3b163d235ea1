"""Steering expressions in generations on the embedded model: phases, windows, ablation
(also toward stored means), gates, and what each step records."""
from __future__ import annotations

import pytest
import torch

from max_jupyter.orchestrator.trace import TraceConfig
from max_jupyter.session import Session
from max_jupyter.steering import VectorStore
from max_jupyter.steering import means as means_module

PROMPT = "Describe a walk by the river."


@pytest.fixture(scope="module")
def s(engine, vector):
    session = Session(engine, vectors={"happy": vector})
    yield session
    session.close()


def test_response_phase_leaves_prompt_positions_untouched(s):
    trace = TraceConfig(big_layers=(15,), prompt=True)
    plain = s.generate(PROMPT, max_new_tokens=6, ignore_eos=True, trace=trace)
    reply = s.generate(PROMPT, max_new_tokens=6, ignore_eos=True, trace=trace, steering="1 happy @response")
    whole = s.generate(PROMPT, max_new_tokens=6, ignore_eos=True, trace=trace, steering="1 happy")
    assert torch.equal(reply.prompt_hidden[15], plain.prompt_hidden[15])  # every prompt position
    assert not torch.allclose(whole.prompt_hidden[15], plain.prompt_hidden[15])  # (it would move them)
    assert reply.steps[0].interventions == {} and not reply.steps[0].steered
    assert all(step.interventions == {10: "add", 15: "add"} for step in reply.steps[1:])
    prompt_only = s.generate(PROMPT, max_new_tokens=4, ignore_eos=True, steering="1 happy @prompt")
    assert [bool(step.interventions) for step in prompt_only.steps] == [True, False, False, False]


def test_first_window_steers_exactly_steps_0_to_3(s, engine, vector):
    r = s.generate(PROMPT, max_new_tokens=8, ignore_eos=True, steering="1.5 happy @first:4")
    assert [bool(step.interventions) for step in r.steps] == [True] * 4 + [False] * 4
    deltas = vector.deltas(1.5, engine.residual_norms, engine.device, engine.dtype)
    tokens = [int(engine.prefill(r.prompt_ids, deltas).logits.argmax())]  # the same loop by hand
    for step in range(1, 8):
        tokens.append(int(engine.step(tokens[-1], deltas if step < 4 else None).logits.argmax()))
    assert r.token_ids == tokens
    later = s.generate(PROMPT, max_new_tokens=5, ignore_eos=True, steering="1.5 happy @after:3")
    assert [bool(step.interventions) for step in later.steps] == [False] * 3 + [True] * 2


def test_ablation_in_a_generation_removes_the_direction_everywhere(s, vector):
    unit = vector.directions[15] / vector.directions[15].norm()
    r = s.generate(PROMPT, max_new_tokens=5, ignore_eos=True, steering="!happy@15 + 0.5 happy@10",
                   trace=TraceConfig(big_layers=(15,), prompt=True))
    for rows in (r.prompt_hidden[15], r.big_hidden[15]):
        assert ((rows @ unit).abs() / rows.norm(dim=-1)).max() <= 1e-3
    assert all(step.interventions == {10: "add", 15: "ablate1"} for step in r.steps)
    both = s.generate(PROMPT, max_new_tokens=2, steering="!happy@15 + happy[-1,1]@15 + 0.5 happy@15")
    assert both.steps[0].interventions == {15: "ablate1+clamp1+add"}


def test_mean_ablation_is_measured_once_and_stored_with_the_vector(engine, vector, tmp_path):
    store = VectorStore(tmp_path / "v.sqlite")
    store["happy"] = vector
    session = Session(engine, vectors=store)
    try:
        means_module._known.clear()  # as in a fresh process
        r = session.generate(PROMPT, max_new_tokens=3, steering="!happy=mean@15",
                             trace=TraceConfig(big_layers=(15,), prompt=True))
        stored = store.means("happy")
        assert set(stored) == {10, 15}
        unit = vector.directions[15] / vector.directions[15].norm()
        torch.testing.assert_close(r.prompt_hidden[15] @ unit, torch.full((len(r.prompt_ids),), stored[15]),
                                   rtol=0, atol=1e-3 * float(r.prompt_hidden[15].norm(dim=-1).max()))
        means_module._known.clear()
        calls = engine.forward_calls
        session.compile("!happy=mean")  # read from the store: no forward
        assert engine.forward_calls == calls
    finally:
        session.close()
        store.close()


def test_a_gate_fires_as_its_probe_crosses_the_threshold(engine, small, vector):
    session = Session(engine, small, vectors={"happy": vector})
    try:
        probe = "@when:happy>1e+09"
        never = session.generate(PROMPT, max_new_tokens=12, ignore_eos=True, steering="1 happy @when:happy>1e9")
        scores = [step.scores[probe] for step in never.steps]
        assert not any(step.steered for step in never.steps)
        x = sorted(scores)[len(scores) // 2]
        r = session.generate(PROMPT, max_new_tokens=12, ignore_eos=True, steering=f"1 happy @when:happy>{x:.6g}")
        name = next(iter(r.steps[0].scores))
        fired = [bool(step.mixes_on) for step in r.steps]
        assert fired == [step.scores[name] > float(f"{x:.6g}") for step in r.steps]  # per step, as it crosses
        assert fired == [step.interventions == {10: "add", 15: "add"} for step in r.steps]
        assert any(fired) and not all(fired)
        assert all(step.mixes_on in ((), (f"when:1*happy {name}",)) for step in r.steps)
    finally:
        session.close()


def test_steer_sets_the_live_mix_and_its_gates(engine, small, vector):
    session = Session(engine, small, vectors={"happy": vector})
    try:
        session.steer("0.5 happy @response; !happy@10; 2 happy @when:happy>3")
        assert session.expression() == "0.5*happy @response; !happy@10; 2*happy @when:happy>3"
        assert list(session.judges) == ["@when:happy>3"]
        session.steer("happy:0.25")  # the old gate goes
        assert session.expression() == "0.25*happy" and not session.judges and not session.mixes
        with pytest.raises(Exception, match="column 9"):
            session.steer("happy + sad")
        assert session.expression() == "0.25*happy"  # refused: nothing changed
    finally:
        session.close()
