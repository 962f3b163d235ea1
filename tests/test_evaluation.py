"""The concept library, the probes, the three scores and ``Session.evaluate`` (docs/evaluation.md):
the library's texts are disjoint; a planted collapse scores low; relevance tells an answer's
own prompt from others; the joy and french probes read held-out texts at AUROC >= 0.85 on
the embedded model; a concept trains on first use and is cached; the random control stays
near no steering on the concept; per-token probe readings; ``%max_eval`` and ``--steer``
with a concept name."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from max_jupyter.errors import BadArgumentError, UnknownNameError
from max_jupyter.evaluation.degeneracy import degeneracy
from max_jupyter.evaluation.evaluate import DEFAULT_COEFS, random_control
from max_jupyter.evaluation.result import Evaluation
from max_jupyter.evaluation.scores import (
    DISTRACTORS,
    Answer,
    FluencyScale,
    fluency_scale,
    harmonic_mean,
    relevance,
    score_answers,
)
from max_jupyter.steering.concepts import concept, concept_layers, library, outdated
from max_jupyter.steering.probe import _logistic, auroc
from max_jupyter.steering.store import VectorStore
from max_jupyter.tokenizer import token_pieces

COHERENT = ("What a joyful place a train station is at rush hour! Friends wave and laugh, and the "
            "sunlight makes the whole hall glow.")
COLLAPSED = "happy happy happy happy happy happy joy joy joy joy happy happy happy happy happy happy"


# ---------------------------------------------------------------- the library (fast)

def test_the_library_has_twelve_concepts_with_disjoint_texts():
    concepts = library()
    assert len(concepts) >= 12
    for c in concepts.values():
        training = {*c.positive, *c.negative}
        scoring = {*c.scoring_positive, *c.scoring_negative}
        assert len(c.pairs) >= 10 and len(c.scoring_positive) >= 12 and len(c.scoring_negative) >= 12
        assert len(training) == 2 * len(c.pairs), c.name  # every text once
        assert not training & scoring, c.name
        assert not set(c.prompts) & (training | scoring), c.name
        assert c.system and c.opposite and c.name in concepts
    assert concept_layers(30) == [12, 13, 14, 15]
    with pytest.raises(UnknownNameError, match="did you mean 'joy'"):
        concept("joyy")


def test_harmonic_mean_and_relevance_are_as_documented():
    assert harmonic_mean((2.0, 2.0, 2.0)) == pytest.approx(2.0)
    assert harmonic_mean((2.0, 1.0, 0.0)) == 0.0
    assert harmonic_mean((2.0, 1.0, 1.0)) == pytest.approx(3 / (0.5 + 1 + 1))
    assert relevance(10.0, [30.0, 30.0]) == pytest.approx(2.0)  # its own prompt, surely
    assert relevance(30.0, [30.0, 30.0]) == pytest.approx(0.0)  # fits any prompt: chance
    assert relevance(40.0, [10.0, 10.0]) == 0.0


def test_a_planted_collapse_is_never_fluent():
    scale = FluencyScale(fluent=20.0, broken=2000.0)
    coherent = degeneracy(COHERENT.split(" "))
    collapsed = degeneracy(COLLAPSED.split(" "))
    assert scale.score(20.0, coherent) == pytest.approx(2.0)
    assert scale.score(1.01, collapsed) == 0.0  # however likely its loop is
    assert scale.score(2000.0, coherent) == 0.0 and 0 < scale.score(200.0, coherent) < 2.0


def test_a_probe_is_not_moved_by_features_its_texts_barely_vary():
    """28 texts told apart by feature 0; features 8-39 barely vary among them. Readings of
    the negative class with those quiet features moved (as a generated answer moves what
    short scoring sentences share) stay negative: scaled by their own tiny spread
    (SCALE_SHRINK = 0), 9 of these 20 read as P(concept) 1.0."""
    gen = torch.Generator().manual_seed(0)
    y = torch.cat([torch.ones(14), torch.zeros(14)])
    x = torch.randn(28, 40, generator=gen)
    x[:, 0] += 4 * (2 * y - 1)
    x[:, 8:] *= 0.01
    mean, scale, weight, bias = _logistic(x, y)
    moved = torch.zeros(20, 40)
    moved[:, 0] = -4
    moved[:, 8:] = 0.5 * torch.randn(20, 32, generator=gen).sign()
    assert float(torch.sigmoid(((moved - mean) / scale) @ weight + bias).max()) < 0.1


def test_auroc_and_random_control():
    assert auroc(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1, 0])) == 0.5
    from max_jupyter.engines.base import ModelIdentity
    from max_jupyter.steering.vector import SteeringVector

    model = ModelIdentity("LlamaForCausalLM", 4, 8, 100, "f" * 12)
    v = SteeringVector({1: torch.ones(8), 2: 3 * torch.ones(8)}, model, "v")
    r = random_control(v, seed=1)
    assert r.norms() == pytest.approx(v.norms())
    assert abs(float(r.directions[1] @ v.directions[1])) < v.norms()[1] ** 2  # not the vector
    assert random_control(v, seed=1).checksum() == r.checksum() != random_control(v, seed=2).checksum()


# ---------------------------------------------------------------- on the embedded model (slow)

@pytest.mark.slow
def test_probes_read_held_out_texts(session):
    for name in ("joy", "french"):
        probe = session.probe(name)
        assert probe.auroc >= 0.85, probe
        assert session.probe(name) is probe  # fitted once per session
        c = concept(name)
        p = probe.score_texts(session.reader, [c.scoring_positive[0], c.scoring_negative[0]])
        assert p[0] > p[1]


@pytest.mark.slow
def test_scores_rank_a_planted_collapse_below_coherent_text(session):
    reader, probe = session.reader, session.probe("joy")
    c = concept("joy")
    scale = fluency_scale(reader, [*c.scoring_positive, *c.scoring_negative])
    assert scale.fluent < scale.broken
    prompts = ["Describe a busy train station.", "How do I make a cup of tea?", "Tell me about the moon."]
    chats = [reader.tokenizer.chat(p) for p in prompts]

    def answer(text: str, i: int = 0) -> Answer:
        ids = reader.tokenizer.encode(text)
        return Answer(chats[i], ids, token_pieces(reader.tokenizer, ids),
                      [chats[(i + d) % 3] for d in range(1, DISTRACTORS + 1)])

    coherent, collapsed = score_answers(reader, probe, scale, [answer(COHERENT), answer(COLLAPSED)])
    assert collapsed.concept > 1.0  # the probe likes the loop; fluency does not
    assert collapsed.fluency == 0.0 and collapsed.harmonic == 0.0
    assert coherent.concept > 1.0 and coherent.fluency > 1.0 and coherent.relevance > 1.0
    assert coherent.harmonic > 1.0
    # relevance tells the answer's own prompt: the same answer read as one to the tea prompt
    (misplaced,) = score_answers(reader, probe, scale, [answer(COHERENT, 1)])
    assert misplaced.relevance < 0.5 < coherent.relevance


@pytest.mark.slow
def test_a_concept_trains_on_first_use_and_is_cached(engine):
    from max_jupyter.session import Session

    with VectorStore(":memory:") as store, Session(engine, vectors=store) as s:
        plain = s.generate("Describe a busy train station.", max_new_tokens=8)
        steered = s.generate("Describe a busy train station.", max_new_tokens=8, steering={"formal": 0.3})
        assert "formal" in store and store.info("formal").tags == ("concept",)
        assert store.info("formal").method == "svd_diff, read=reply"  # CONCEPT_READ
        assert store["formal"].layers == tuple(concept_layers(engine.identity.num_layers))
        assert steered.token_ids != plain.token_ids
        assert s.vector("formal").checksum() == store["formal"].checksum()  # not trained again
        assert len(store.versions("formal")) == 1
        assert s.concept_vector_name("joy") == ("joy", False)
        r = s.generate("Describe a busy train station.", max_new_tokens=10, probes=["joy"])
        readings = r.probe_scores["joy"]
        assert readings.shape == (len(r.token_ids),) and ((readings >= 0) & (readings <= 1)).all()
        whole = s.probe("joy").probability(
            s.run(lambda _: _answer_states(s, r)).mean(0, keepdim=True))[0]
        assert float(readings[-1]) == pytest.approx(float(whole), abs=1e-4)


@pytest.mark.slow
def test_a_concept_vector_from_an_older_recipe_is_trained_again(engine):
    from max_jupyter.session import Session
    from max_jupyter.steering.training import train_vector

    layers = concept_layers(engine.identity.num_layers)
    joy, warm = concept("joy"), concept("warm")
    old = train_vector(engine, joy.positive, joy.negative, layers=layers)  # the last-token recipe
    mine = train_vector(engine, warm.positive[:3], warm.negative[:3], layers=layers)
    with VectorStore(":memory:") as store, Session(engine, vectors=store) as s:
        store.save("joy", old, method="svd_diff", pairs=list(joy.pairs), tags=("concept",))
        # yours, under a concept's name (tagged as one, but on other pairs): kept
        store.save("warm", mine, method="svd_diff", pairs=list(warm.pairs[:3]), tags=("concept",))
        assert outdated(store, "joy", "joy") and not outdated(store, "warm", "warm")
        assert not outdated({"joy": old}, "joy", "joy")  # a dict keeps no recipe
        assert s.concept_vector_name("joy") == ("joy", False)
        assert s.concept_vector_name("warm") == ("warm", True)
        assert s.vector("warm").checksum() == mine.checksum()
        new = s.vector("joy")
        assert len(store.versions("joy")) == 2 and store.info("joy").method == "svd_diff, read=reply"
        assert new.checksum() != old.checksum() and s.concept_vector_name("joy") == ("joy", True)
        expected = train_vector(engine, joy.positive, joy.negative, layers=layers, read="reply")
        for layer in layers:
            torch.testing.assert_close(new.directions[layer], expected.directions[layer])


def _answer_states(s, r):
    from max_jupyter.steering.reading import read_rows

    layer = s.probe("joy").layer
    return read_rows(s.reader, [r.prompt_ids + r.token_ids], [layer])[0][layer][len(r.prompt_ids):]


def test_bad_evaluations_are_refused_before_any_forward(engine):
    from max_jupyter.session import Session

    with Session(engine) as s:
        calls = engine.forward_calls
        for kwargs, match in [({"vector": "nonsense"}, "no vector named 'nonsense'"),
                              ({"vector": "joy", "coefs": [0.0, 1.0]}, "coefs=.* holds 0"),
                              ({"vector": "joy", "coefs": "0.5"}, "coefs="),
                              ({"vector": "joy", "prompts": ["a", "b"]}, "prompts=.* holds 2"),
                              ({"vector": "joy", "max_new_tokens": 0}, "max_new_tokens=0")]:
            with pytest.raises(BadArgumentError, match=match):
                s.evaluate(**kwargs)
        with pytest.raises(BadArgumentError, match="concept='joy'"):
            s.evaluate(random_control(_tiny_vector(engine)))
        assert engine.forward_calls == calls


def _tiny_vector(engine):
    from max_jupyter.steering.vector import SteeringVector

    return SteeringVector({12: torch.ones(engine.identity.hidden_size)}, engine.identity, "plain")


@pytest.mark.slow
def test_evaluate_joy_with_baselines(engine, capsys):
    """A small evaluation: every condition scored on its split, the chosen coefficient from
    the eval split, the random control near no steering on the concept, the table, the plot;
    with ``progress=False`` no bar, not even the concept's training on first use."""
    from max_jupyter.jupyter.plots import plot_evaluation
    from max_jupyter.session import Session

    prompts = list(concept("joy").prompts[:8])
    with Session(engine) as s:
        ev = s.evaluate("joy", prompts=prompts, coefs=[0.35, 1.0], max_new_tokens=16, progress=False)
    assert "joy" in s.vectors and "%|" not in capsys.readouterr().err  # trained, with no bar
    assert isinstance(ev, Evaluation) and not ev.interrupted
    assert len(ev.rows) == (2 + 2) * 8 + 2 * 4
    assert {r.split for r in ev.select("random")} == {"test"} and ev.chosen_coef in (0.35, 1.0)
    summary = ev.summary()
    assert abs(summary["random_concept"] - summary["none_concept"]) < 0.5, summary
    assert all(0 <= v <= 2 for r in ev.rows for v in r.values().values())
    assert ev.probe_auroc >= 0.85
    html = ev._repr_html_()
    assert html.count("<tr") == 1 + len(ev.table()) and "prompting" in html
    fig = plot_evaluation(ev)
    xs, ys = fig.axes[0].get_lines()[0].get_data()
    assert list(ys) == pytest.approx([ev.means("steered", c)["concept"] for c in ev.coefs])
    pd = pytest.importorskip("pandas")
    frame = ev.to_pandas()
    assert isinstance(frame, pd.DataFrame) and len(frame) == len(ev.rows)


@pytest.mark.slow
def test_evaluate_keeps_finished_conditions_on_ctrl_c(engine):
    """Ctrl-C in the second condition: the first condition's answers come back scored."""
    import _thread

    from max_jupyter.session import Session

    prompts = list(concept("joy").prompts[:6])
    with Session(engine) as s:
        s.probe("joy")
        s.vector("joy")  # trained and fitted before the watch starts
        start, stop = engine.forward_calls, threading.Event()

        def watch() -> None:  # the references take 4 passes, a condition about 26
            while not stop.wait(0.05):
                if engine.forward_calls > start + 44:
                    _thread.interrupt_main()
                    return

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            ev = s.evaluate("joy", prompts=prompts, coefs=list(DEFAULT_COEFS), max_new_tokens=24,
                            progress=False)
        finally:
            stop.set()
            watcher.join()
    assert ev.interrupted
    assert 0 < len(ev.rows) < (len(DEFAULT_COEFS) + 2) * 6 and len(ev.rows) % 6 == 0  # whole conditions
    assert all(math.isfinite(r.scores.concept) for r in ev.rows)
