"""Steering vectors as values, the mix, and training, on the real embedded model."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from max_jupyter.errors import BadArgumentError
from max_jupyter.steering import Mix, ModelMismatchError, SteeringVector, train_vector

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


def test_coefficient_two_equals_vector_doubled(engine, ident, ids):
    v = rand_vector(ident, [8, 12]) * 0.5
    mix = Mix(ident)
    mix.set("v", v, coef=2.0)
    doubled = Mix(ident)
    doubled.set("v", v * 2, coef=1.0)
    a = engine.prefill(ids, mix.deltas(engine)).logits
    b = engine.prefill(ids, doubled.deltas(engine)).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, engine.prefill(ids).logits)


def test_mix_sums_vectors_and_selects_layers(engine, ident):
    a, b = rand_vector(ident, [3, 4], 0), rand_vector(ident, [4], 1)
    mix = Mix(ident)
    mix.set("a", a, coef=0.5, layers=[4])
    mix.set("b", b, coef=-1.0)
    deltas = mix.deltas(engine)
    assert set(deltas) == {4}
    torch.testing.assert_close(deltas[4], 0.5 * a.directions[4] - b.directions[4])
    assert mix.deltas(engine) is deltas  # unchanged mix: cached
    mix.set_coef("b", 0.0)
    torch.testing.assert_close(mix.deltas(engine)[4], 0.5 * a.directions[4])
    mix.remove("a")
    mix.clear()
    assert mix.deltas(engine) is None and len(mix) == 0


def test_mix_changes_from_another_thread_are_whole(engine, ident):
    a = rand_vector(ident, [2])
    mix = Mix(ident)
    mix.set("a", a, coef=0.0)
    seen = set()

    def slider():
        for k in range(2000):
            mix.set_coef("a", float(k % 5))

    t = threading.Thread(target=slider)
    t.start()
    while True:
        running = t.is_alive()
        deltas = mix.deltas(engine)  # None at coefficient 0: a zero adds nothing
        coef = 0.0 if deltas is None else float(deltas[2][0] / a.directions[2][0])
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
    up = mood_score(engine, (0.5 * vector).deltas(device=engine.device, dtype=engine.dtype))
    down = mood_score(engine, (-0.5 * vector).deltas(device=engine.device, dtype=engine.dtype))
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
