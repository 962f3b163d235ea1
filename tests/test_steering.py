"""Steering vectors as values, the mix, and training, on the real embedded model."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from max_jupyter.engines import residual
from max_jupyter.errors import BadArgumentError
from max_jupyter.steering import Mix, ModelMismatchError, SteeringVector, train_vector
from max_jupyter.testing import ScriptedEngine

pytestmark = pytest.mark.slow  # the embedded model

PROMPT = "Tell me about your day."


@pytest.fixture(scope="module")
def ident(engine):
    return engine.identity


@pytest.fixture(scope="module")
def ids(engine):
    return engine.tokenizer.chat(PROMPT)


def rand_vector(ident, layers, seed=0, label="r"):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({l: torch.randn(ident.hidden_size, generator=g) for l in layers}, ident, label)


def test_vector_arithmetic_is_per_layer(ident):
    a, b = rand_vector(ident, [1, 2], 0), rand_vector(ident, [2, 3], 1)
    s = a + b
    assert s.layers == (1, 2, 3)
    torch.testing.assert_close(s.directions[2], a.directions[2] + b.directions[2])
    torch.testing.assert_close((a - b).directions[3], -b.directions[3])
    torch.testing.assert_close((2 * a).directions[1], a.directions[1] * 2)
    torch.testing.assert_close((a / 4).directions[1], a.directions[1] / 4)
    torch.testing.assert_close((-a).directions[2], -a.directions[2])
    assert a.select([2]).layers == (2,)
    assert all(abs(n - 1) < 1e-6 for n in a.normalized().norms().values())


def test_zero_vector_gives_exact_unsteered_logits(engine, ident, ids):
    zero = SteeringVector({l: torch.zeros(ident.hidden_size) for l in (5, 10, 20)}, ident)
    assert torch.equal(engine.prefill(ids, Mix.of(zero).deltas(engine)).logits,
                       engine.prefill(ids).logits)


def test_coefficient_not_length_sets_the_push(engine, ident, ids):
    """Only a vector's directions steer: 5 * v at a coefficient adds what v does; twice the
    coefficient adds twice the delta."""
    v = rand_vector(ident, [8, 12])
    a, b, c = (Mix.of(v, 0.2).deltas(engine), Mix.of(v * 5, 0.2).deltas(engine),
               Mix.of(v, 0.4).deltas(engine))
    for layer in (8, 12):
        torch.testing.assert_close(a[layer], b[layer])
        torch.testing.assert_close(c[layer], 2 * a[layer])
    assert not torch.equal(engine.prefill(ids, a).logits, engine.prefill(ids).logits)


def test_a_coefficient_pushes_alike_on_any_model(engine):
    """The coefficient scale: on the embedded model and on a scripted one (other residual
    norms), a vector whose values follow the model's norms gets, at coefficient c, a delta
    of ``c / layers * norm`` at each layer, whatever its length; the deltas of any vector
    push c typical residual norms in all, shared as its values share it, and a raw
    coefficient r is the coefficient ``r * push``."""
    for model in (engine, ScriptedEngine(num_layers=8, hidden_size=64)):
        norms = residual.measure(model) if model is not engine else model.residual_norms
        layers = (2, 4, 6)
        g = torch.Generator().manual_seed(3)
        units = {l: torch.nn.functional.normalize(torch.randn(model.identity.hidden_size, generator=g), dim=0)
                 for l in layers}
        even = SteeringVector({l: 1e3 * norms[l] * u for l, u in units.items()}, model.identity)
        deltas = Mix.of(even, 0.6).deltas(model)
        for l in layers:
            torch.testing.assert_close(deltas[l], 0.2 * norms[l] * units[l])
        odd = SteeringVector({l: (l + 1.0) * u for l, u in units.items()}, model.identity)
        deltas = Mix.of(odd, 0.6).deltas(model)
        shares = [float(deltas[l].norm()) / norms[l] for l in layers]
        assert sum(shares) == pytest.approx(0.6)
        assert shares == pytest.approx([0.6 * (l + 1) / norms[l] / odd.push(norms) for l in layers])
        raw = Mix.of(odd, 0.3 * odd.push(norms)).deltas(model)
        for l in layers:
            torch.testing.assert_close(raw[l], 0.3 * odd.directions[l])


def test_mix_sums_vectors_and_selects_layers(engine, ident):
    a, b = rand_vector(ident, [3, 4], 0), rand_vector(ident, [4], 1)
    norm = engine.residual_norms[4]
    unit = lambda v: v.directions[4] / v.directions[4].norm()  # noqa: E731
    mix = Mix(ident)
    mix.set("a", a, coef=0.5, layers=[4])
    mix.set("b", b, coef=-1.0)
    deltas = mix.deltas(engine)
    assert set(deltas) == {4}
    torch.testing.assert_close(deltas[4], (0.5 * unit(a) - unit(b)) * norm)
    assert mix.deltas(engine) is deltas  # unchanged mix: cached
    mix.set_coef("b", 0.0)
    torch.testing.assert_close(mix.deltas(engine)[4], 0.5 * unit(a) * norm)
    mix.remove("a")
    mix.clear()
    assert mix.deltas(engine) is None and len(mix) == 0


def test_mix_changes_from_another_thread_are_whole(engine, ident):
    a = rand_vector(ident, [2])
    mix = Mix(ident)
    mix.set("a", a, coef=0.0)
    one = Mix.of(a, 1.0).deltas(engine)[2]  # what coefficient 1 adds
    seen = set()

    def slider():
        for k in range(2000):
            mix.set_coef("a", float(k % 5))

    t = threading.Thread(target=slider)
    t.start()
    while True:
        running = t.is_alive()
        deltas = mix.deltas(engine)  # None at coefficient 0: a zero adds nothing
        coef = 0.0 if deltas is None else float(deltas[2][0] / one[0])
        assert abs(coef - round(coef)) < 1e-4  # always one of the slider's values, never a blend
        seen.add(round(coef))
        if not running:
            break
    t.join()
    assert seen and mix.entries["a"].coef == 4.0


def test_bad_vectors_are_refused(engine, ident):
    other = dataclasses.replace(ident, fingerprint="0" * 64)
    with pytest.raises(ModelMismatchError, match="made for"):
        rand_vector(ident, [1]) + rand_vector(other, [1])
    with pytest.raises(ModelMismatchError):
        Mix.of(rand_vector(other, [1])).deltas(engine)
    with pytest.raises(ModelMismatchError):
        Mix(ident).set("x", rand_vector(other, [1]))
    with pytest.raises(ValueError, match=r"shape \[100\]"):
        SteeringVector({1: torch.zeros(100)}, ident)
    with pytest.raises(ValueError, match="NaN or inf"):
        SteeringVector({1: torch.full((576,), float("nan"))}, ident)
    with pytest.raises(ValueError, match="NaN or inf"):
        SteeringVector({1: torch.full((576,), float("inf"))}, ident)
    with pytest.raises(BadArgumentError, match="out of range"):
        SteeringVector({30: torch.zeros(576)}, ident)
    with pytest.raises(BadArgumentError, match="has no direction at"):
        rand_vector(ident, [1]).select([2])
    with pytest.raises(ValueError, match="not finite"):
        rand_vector(ident, [1]) * float("nan")
    with pytest.raises(KeyError, match="no vector named"):
        Mix(ident).set_coef("missing", 1.0)


def test_save_load_roundtrip(tmp_path, ident):
    v = rand_vector(ident, [3, 9], label="saved")
    v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(tmp_path / "v.safetensors")
    assert w.model == ident and w.label == "saved" and w.layers == (3, 9)
    assert all(torch.equal(v.directions[l], w.directions[l]) for l in v.layers)


JOY = ["I am so happy today, everything is wonderful!", "What a delightful, sunny morning.",
       "We laughed and celebrated all night long.", "This gift makes me smile with joy.",
       "I love my friends, they make me so cheerful.", "The party was fun and full of laughter.",
       "Good news! I passed the exam and I'm thrilled.", "The puppy is adorable and playful.",
       "I feel grateful and full of energy.", "Spring flowers make me feel glad.",
       "Our holiday was a beautiful, happy time.", "She danced with delight at the wedding."]
GLOOM = ["I am so sad today, everything is awful.", "What a miserable, rainy morning.",
         "We cried and mourned all night long.", "This letter makes me weep with grief.",
         "I miss my friends, I feel so lonely.", "The funeral was quiet and full of tears.",
         "Bad news. I failed the exam and I'm devastated.", "The old dog is sick and suffering.",
         "I feel hopeless and full of dread.", "Grey winter skies make me feel gloomy.",
         "Our holiday was a terrible, unhappy time.", "She sobbed with sorrow at the hospital."]
HELD_OUT = ["Today I feel", "My weekend was", "Honestly, the news made me", "When I woke up I was"]
POS_WORDS, NEG_WORDS = [" happy", " great", " glad", " excited"], [" sad", " terrible", " upset", " depressed"]


def mood_score(engine, deltas=None) -> float:
    """Mean log-prob margin of positive over negative continuation words, on held-out prompts."""
    tok = engine.tokenizer
    pos = [tok.encode(w)[0] for w in POS_WORDS]
    neg = [tok.encode(w)[0] for w in NEG_WORDS]
    total = 0.0
    for p in HELD_OUT:
        logp = torch.log_softmax(engine.prefill(tok.encode(p, True), deltas).logits, -1)
        total += float(logp[pos].logsumexp(0) - logp[neg].logsumexp(0))
    return total / len(HELD_OUT)


@pytest.mark.parametrize("method", ["svd_diff", "mean_diff"])
def test_trained_vector_moves_held_out_mood(engine, method):
    vector = train_vector(engine, JOY, GLOOM, layers=range(10, 16), method=method)
    assert vector.layers == tuple(range(10, 16))
    base = mood_score(engine)
    up = mood_score(engine, vector.deltas(0.25, engine.residual_norms, engine.device, engine.dtype))
    down = mood_score(engine, vector.deltas(-0.25, engine.residual_norms, engine.device, engine.dtype))
    assert up > base + 1.0 and down < base - 1.0, (down, base, up)


def test_training_input_errors(engine):
    with pytest.raises(ValueError, match="is empty"):
        train_vector(engine, [], [])
    with pytest.raises(ValueError, match="does not pair with 3 positive"):
        train_vector(engine, ["a", "b", "c"], ["d", "e"])
    with pytest.raises(BadArgumentError, match="out of range"):
        train_vector(engine, ["a"], ["b"], layers=[99])
    with pytest.raises(BadArgumentError, match="is unknown"):
        train_vector(engine, ["a"], ["b"], method="ica")
