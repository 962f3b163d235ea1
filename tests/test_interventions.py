"""Interventions at the engine (transformers, the embedded model): ablation, clamp and add
per position, their order, against a plain-PyTorch reference of the same projection."""
from __future__ import annotations

import pytest
import torch

from max_jupyter.engines.intervention import Intervention, apply, combine, labels
from max_jupyter.errors import BackendUnavailableError, BadArgumentError
from max_jupyter.testing import ScriptedEngine

LAYER = 10


@pytest.fixture(scope="module")
def ids(engine):
    return engine.tokenizer.chat("Tell me about the sea and the ships that sail on it.")


def unit(width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(width, generator=g)
    return u / u.norm()


def reference_logits(engine, ids, layer, u, target=0.0):
    """The model's logits with the projection on ``u`` set to ``target`` at ``layer``'s
    output, by a plain forward hook written here (not the engine's)."""
    model = engine.model

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h - ((h @ u) - target).unsqueeze(-1) * u
        return (h, *output[1:]) if isinstance(output, tuple) else h
    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0, -1].float()
    finally:
        handle.remove()


def test_ablation_removes_the_projection_at_every_position(engine, ids):
    u = unit(engine.identity.hidden_size, 1)
    # a direction the residual really has: the mean residual at the layer (a large projection)
    plain = engine.prefill(ids, capture=[LAYER]).hidden[LAYER]
    real = plain.mean(0) / plain.mean(0).norm()
    for d in (u, real):
        out = engine.prefill(ids, {LAYER: Intervention(ablate=d[None], targets=torch.zeros(1))},
                             capture=[LAYER])
        h = out.hidden[LAYER]
        ratio = (h @ d).abs() / h.norm(dim=-1)
        assert ratio.max() <= 1e-3, ratio.max()
        assert (plain @ d).abs().max() > 100 * (h @ d).abs().max()  # it was there before
        torch.testing.assert_close(out.logits, reference_logits(engine, ids, LAYER, d), rtol=1e-4, atol=1e-4)


def test_mean_ablation_sets_the_projection_to_its_target(engine, ids):
    u = unit(engine.identity.hidden_size, 2)
    out = engine.prefill(ids, {LAYER: Intervention(ablate=u[None], targets=torch.tensor([3.5]))},
                         capture=[LAYER])
    torch.testing.assert_close(out.hidden[LAYER] @ u, torch.full((len(ids),), 3.5), rtol=0, atol=1e-3)
    torch.testing.assert_close(out.logits, reference_logits(engine, ids, LAYER, u, 3.5), rtol=1e-4, atol=1e-4)


def test_clamp_limits_the_projection_and_leaves_the_rest(engine, ids):
    plain = engine.prefill(ids, capture=[LAYER]).hidden[LAYER]
    d = plain.mean(0) / plain.mean(0).norm()
    p = plain @ d
    lo, hi = float(p.quantile(0.25)), float(p.quantile(0.75))
    op = Intervention(clamp=d[None], low=torch.tensor([lo]), high=torch.tensor([hi]))
    h = engine.prefill(ids, {LAYER: op}, capture=[LAYER]).hidden[LAYER]
    q = h @ d
    assert q.min() >= lo - 1e-3 and q.max() <= hi + 1e-3
    inside = (p >= lo) & (p <= hi)
    torch.testing.assert_close(h[inside], plain[inside])  # rows within the range are untouched
    assert not torch.allclose(h[~inside], plain[~inside])


def test_order_is_ablate_then_clamp_then_add():
    x = torch.randn(5, 8)
    u = unit(8, 3)
    add = 2.0 * u
    op = Intervention(add=add, ablate=u[None], targets=torch.zeros(1),
                      clamp=u[None], low=torch.tensor([-0.5]), high=torch.tensor([0.5]))
    y = apply(x, op)
    torch.testing.assert_close(y @ u, torch.full((5,), 2.0))  # the add survives: it runs last
    assert op.label == "ablate1+clamp1+add"
    both = combine(torch.ones(8), op)
    assert both.label == "ablate1+clamp1+add" and torch.equal(both.add, add + 1)
    assert labels({3: op, 1: torch.ones(8)}) == {1: "add", 3: "ablate1+clamp1+add"}


def test_plain_deltas_still_add(engine, ids):
    d = 0.5 * unit(engine.identity.hidden_size, 4)
    a = engine.prefill(ids, {LAYER: d}).logits
    b = engine.prefill(ids, {LAYER: Intervention(add=d)}).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_interventions_are_refused_before_any_forward(engine, ids):
    width = engine.identity.hidden_size
    with pytest.raises(BadArgumentError, match="unit"):
        Intervention(ablate=torch.ones(1, width), targets=torch.zeros(1))
    with pytest.raises(BadArgumentError, match="low"):
        u = unit(width, 5)[None]
        Intervention(clamp=u, low=torch.tensor([1.0]), high=torch.tensor([0.0]))
    calls = engine.forward_calls
    with pytest.raises(BadArgumentError, match="width"):
        engine.prefill(ids, {LAYER: Intervention(ablate=unit(8, 1)[None], targets=torch.zeros(1))})
    with pytest.raises(BadArgumentError, match="norm"):  # the steering bound holds for the add
        engine.prefill(ids, {LAYER: Intervention(add=1e6 * unit(width, 6))})
    assert engine.forward_calls == calls
    scripted = ScriptedEngine(num_layers=4)
    with pytest.raises(BackendUnavailableError, match="only adds"):
        scripted.prefill([1, 2], {1: Intervention(ablate=unit(scripted.identity.hidden_size, 1)[None],
                                                  targets=torch.zeros(1))})


def test_unchanged_deltas_are_checked_once_and_a_write_in_place_is_seen(engine):
    """The steering loop passes one mix's deltas at every step: ``_checked_ops`` checks them
    once and hands back the same dict (the ExLlamaV2 backend then skips refilling its graph
    buffers); a tensor written in place since is checked again (here: refused, past the
    bound) instead of passing as unchanged."""
    vector = torch.randn(engine.identity.hidden_size, generator=torch.Generator().manual_seed(0))
    u = vector / vector.norm()
    deltas = {2: vector.clone(), 4: Intervention(ablate=u[None], targets=torch.zeros(1))}
    engine.prefill([1, 2, 3], deltas)
    first = engine._checked_ops(deltas)
    assert engine._checked_ops(deltas) is first
    deltas[4].targets.fill_(1.0)  # an Intervention's tensor written in place
    second = engine._checked_ops(deltas)
    assert second is not first
    deltas[2].mul_(1e12)  # in place: the same objects, new values
    with pytest.raises(BadArgumentError, match="deltas"):
        engine.step(4, deltas)
    deltas[2].div_(1e12)
    assert engine._checked_ops(dict(deltas)) is not engine._checked_ops(deltas)  # another mapping: checked anew


def test_deltas_made_under_inference_mode_steer(engine):
    """Inference tensors keep no write counter; the memo of checked deltas then checks them
    at every call instead of failing ("Inference tensors do not track version counter")."""
    with torch.inference_mode():
        u = unit(engine.identity.hidden_size, 3)
        deltas = {2: 0.1 * u, 4: Intervention(ablate=u[None], targets=torch.zeros(1))}
    engine.prefill([1, 2, 3], deltas)
    first = engine._checked_ops(deltas)
    assert engine._checked_ops(deltas) is not first and engine.step(4, deltas).logits.isfinite().all()



def test_refused_deltas_cost_no_forward_on_a_fresh_model():
    """Bad deltas and interventions a backend does not run are refused before the forward
    that measures a new model's residual norms (refused before any compute)."""
    from max_jupyter.engines import residual

    engine = ScriptedEngine(seed=9173)  # a model no other test measured
    assert residual.known(engine.identity) is None
    u = unit(engine.identity.hidden_size, 4)
    with pytest.raises(BackendUnavailableError):
        engine.prefill([1, 2, 3], {1: Intervention(ablate=u[None], targets=torch.zeros(1))})
    with pytest.raises(BadArgumentError):
        engine.prefill([1, 2, 3], {1: torch.zeros(engine.identity.hidden_size + 1)})
    assert engine.forward_calls == 0 and residual.known(engine.identity) is None
    engine.prefill([1, 2, 3], {1: 0.1 * u})
    assert residual.known(engine.identity) is not None
