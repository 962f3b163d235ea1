"""The plain generation loop on the real embedded model."""
from __future__ import annotations

import pytest
import torch

from max_jupyter.engines import ContextOverflowError, TransformersEngine
from max_jupyter.orchestrator import SamplingConfig, generate, stream
from max_jupyter.orchestrator.sampling import Sampler
from max_jupyter.steering import Mix, SteeringVector

pytestmark = pytest.mark.slow  # the embedded model

PROMPT = "Name three colours."


def manual_greedy(engine, ids, n, deltas=None):
    out, logits = [], engine.prefill(ids, deltas).logits
    for _ in range(n):
        t = int(logits.argmax())
        out.append(t)
        logits = engine.step(t, deltas).logits
    return out


def test_greedy_equals_manual_argmax_loop(engine):
    g = generate(engine, PROMPT, max_new_tokens=12, ignore_eos=True)
    assert g.token_ids == manual_greedy(engine, engine.tokenizer.chat(PROMPT), 12)
    assert g.finish_reason == "length" and g.text == engine.tokenizer.decode(g.token_ids)


def test_stops_on_eos_and_streams_the_same_text(engine):
    pieces = []
    g = generate(engine, "Say hello in one short sentence.", max_new_tokens=40, on_text=pieces.append)
    assert g.finish_reason == "eos" and len(g.token_ids) < 40
    assert "".join(pieces) == g.text and len(pieces) > 1


def test_stop_string_truncates_and_is_never_shown(engine):
    full = generate(engine, PROMPT, max_new_tokens=30).text
    cut = full.index(",") if "," in full else full.index(" ", 3)
    stop = full[cut:cut + 2]
    pieces = list(stream(engine, PROMPT, max_new_tokens=30, stop=[stop]))
    g = generate(engine, PROMPT, max_new_tokens=30, stop=[stop])
    assert g.finish_reason == "stop" and g.text == full[:cut] == "".join(pieces)


def test_same_seed_same_text_other_seed_other_text(engine):
    cfg = dict(temperature=1.0, top_k=50, top_p=0.95)
    a = generate(engine, PROMPT, max_new_tokens=20, sampling=SamplingConfig(**cfg, seed=7))
    b = generate(engine, PROMPT, max_new_tokens=20, sampling=SamplingConfig(**cfg, seed=7))
    texts = {generate(engine, PROMPT, max_new_tokens=20, sampling=SamplingConfig(**cfg, seed=s)).text
             for s in (1, 2, 3)}
    assert a.token_ids == b.token_ids
    assert len(texts | {a.text}) > 1


def test_sampler_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert (Sampler(SamplingConfig(temperature=1, top_k=2)).probabilities(logits)[2:] == 0).all()
    p = Sampler(SamplingConfig(temperature=1, top_p=0.5)).probabilities(logits)
    assert p[0] == 1.0  # the top token alone reaches 0.5
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


@pytest.mark.parametrize("scale", [6.0, 0.05], ids=["nucleus-in-the-head", "nucleus-past-the-head"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_top_p(scale, top_p):
    """Over a 152k vocabulary (the real pair's): peaked logits put the nucleus among the
    likeliest ``TOP_P_HEAD`` tokens (the fast path), flat ones far past them (the sort).
    Either way the kept set and its renormalised probabilities are the definition's."""
    logits = torch.randn(151_936, generator=torch.Generator().manual_seed(int(top_p * 100))) * scale
    got = Sampler(SamplingConfig(temperature=1, top_p=top_p)).probabilities(logits)
    p = torch.softmax(logits, -1)
    order = p.argsort(descending=True)
    before = p[order].cumsum(0) - p[order]  # the mass of the likelier tokens
    keep = order[before < top_p]
    want = torch.zeros_like(p)
    want[keep] = p[keep] / p[keep].sum()
    assert (len(keep) > 1024) == (scale < 1)
    torch.testing.assert_close(got, want)


def test_steered_generation_uses_the_mix_and_changes_between_steps(engine):
    ident = engine.identity
    v = SteeringVector({l: torch.randn(576, generator=torch.Generator().manual_seed(l)) for l in (6, 7)},
                       ident, "noise")
    ids = engine.tokenizer.chat(PROMPT)
    mix = Mix(ident)
    mix.set("v", v, coef=0.8)
    g = generate(engine, PROMPT, max_new_tokens=8, ignore_eos=True, steering=mix)
    assert g.token_ids == manual_greedy(engine, ids, 8, mix.deltas(engine))
    # Turn the mix off after the third token: the rest equals the unsteered continuation.
    seen = []

    def slider(piece):
        seen.append(piece)
        if len(seen) == 3:
            mix.set_coef("v", 0.0)

    mix.set_coef("v", 0.8)
    g2 = generate(engine, PROMPT, max_new_tokens=8, ignore_eos=True, steering=mix, on_text=slider)
    assert g2.token_ids[:3] == g.token_ids[:3]
    steered = v.deltas(0.8, engine.residual_norms, dtype=engine.dtype)
    engine.prefill(ids, steered)
    for t in g2.token_ids[:2]:
        engine.step(t, steered)
    assert int(engine.step(g2.token_ids[2]).logits.argmax()) == g2.token_ids[3]


def test_prompt_too_long_is_refused_before_compute(engine):
    with pytest.raises(ContextOverflowError):
        generate(engine, [1] * 8190, max_new_tokens=10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(engine, PROMPT, max_new_tokens=0)


def test_interrupt_returns_partial_and_next_generation_is_fresh(engine):
    reference = generate(engine, PROMPT, max_new_tokens=10, ignore_eos=True)
    calls = 0

    def interrupt_on_fifth_step(*_):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt

    handle = engine.layers[12].register_forward_hook(interrupt_on_fifth_step)
    try:
        partial = generate(engine, PROMPT, max_new_tokens=10, ignore_eos=True)
    finally:
        handle.remove()
    assert partial.finish_reason == "interrupted"
    assert partial.token_ids == reference.token_ids[:4]
    again = generate(engine, PROMPT, max_new_tokens=10, ignore_eos=True)
    fresh = generate(TransformersEngine.load(device="cpu"), PROMPT, max_new_tokens=10, ignore_eos=True)
    assert again.token_ids == fresh.token_ids == reference.token_ids
