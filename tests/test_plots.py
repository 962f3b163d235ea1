"""Plots of a real trace: each call returns a Figure whose data are the trace's numbers."""
from __future__ import annotations

import io

import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Polygon, Rectangle

from max_jupyter.errors import BadArgumentError
from max_jupyter.jupyter.lens import logit_lens
from max_jupyter.jupyter.plots import (divergence, plot_divergence, plot_judges, plot_logit_lens,
                                       plot_projection)
from max_jupyter.orchestrator import Always, CognitiveOrchestrator, FunctionJudge, TraceConfig
from max_jupyter.steering import Mix

pytestmark = pytest.mark.slow  # a generation of the embedded model

STEERED = {3, 4, 5, 9}


@pytest.fixture(scope="module")
def result(engine, small, vector):
    """10 steps, steered at STEERED only (a judge on the step index); the small model is
    the same model, so it sees what the big one sees unless the big one is steered."""
    mix = Mix(engine.identity)
    mix.set("happy", vector, 4.0)
    judge = FunctionJudge(lambda ctx: ctx.step in STEERED, name="by-step")
    orch = CognitiveOrchestrator(engine, small, mixes=mix, judges=[judge])
    return orch.generate("Name three fruits.", max_new_tokens=10, ignore_eos=True,
                         trace=TraceConfig(big_layers=(10, 15, 29), full_logits=True))


def shaded_spans(fig: Figure) -> list[tuple[float, float]]:
    ax = fig.axes[0]
    out = []
    for patch in ax.patches:
        if isinstance(patch, (Rectangle, Polygon)):
            xs = patch.get_xy()[:, 0] if isinstance(patch, Polygon) else [patch.get_x(), patch.get_x() + patch.get_width()]
            out.append((min(xs), max(xs)))
    return sorted(out)


def test_projection_lines_are_the_projections(result, vector, engine):
    fig = plot_projection(result, vector, tokenizer=engine.tokenizer)
    assert isinstance(fig, Figure)
    lines = {l.get_label(): l.get_ydata() for l in fig.axes[0].get_lines()}
    assert set(lines) == {"layer 10", "layer 15"}
    for layer in (10, 15):
        v = vector.directions[layer]
        expected = result.big_hidden[layer] @ (v / v.norm())
        torch.testing.assert_close(torch.tensor(lines[f"layer {layer}"], dtype=torch.float32), expected)
    assert shaded_spans(fig) == [(2.5, 5.5), (8.5, 9.5)]
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(labels) == 10 and "".join(labels) == result.text.replace("\n", "\\n")


def test_projection_refuses_a_layer_not_captured(result, vector):
    with pytest.raises(BadArgumentError, match="capture"):
        plot_projection(result, vector, layers=[12])


def test_judge_plot_threshold_and_steered_steps(result):
    fig = plot_judges(result, threshold=0.5)
    ax = fig.axes[0]
    labels = [l.get_label() for l in ax.get_lines()]
    assert "threshold 0.5" in labels
    assert shaded_spans(fig) == [(2.5, 5.5), (8.5, 9.5)]
    with pytest.raises(BadArgumentError, match="no judge 'nope'"):
        plot_judges(result, judge="nope")


def test_divergence_is_zero_until_the_first_steered_step(result):
    """Same weights and context: the models agree until steering changes the big one (its
    cache keeps the steered states afterwards, so they never agree exactly again)."""
    d = divergence(result)
    kl = d["KL(big||small)"]
    assert kl.shape == (10,)
    first = min(STEERED)
    assert (kl[:first].abs() < 1e-3).all()
    assert (kl[sorted(STEERED)] > 1e-2).all()
    torch.testing.assert_close(d["entropy big"][:first], d["entropy small"][:first], atol=1e-3, rtol=0)
    fig = plot_divergence(result)
    assert {l.get_label() for l in fig.axes[0].get_lines()} == {"entropy big", "entropy small", "KL(big||small)"}


def test_logit_lens_last_layer_is_the_models_choice(result, engine):
    lens = logit_lens(engine, result, k=3)
    assert lens.layers == (10, 15, 29)
    assert lens.ids.shape == lens.probs.shape == (3, 10, 3)
    assert torch.equal(lens.ids[-1, :, 0], result.big_topk.ids[:, 0])
    assert ((lens.probs >= 0) & (lens.probs <= 1)).all()
    assert (lens.probs[:, :, 0] >= lens.probs[:, :, 1]).all()
    fig = plot_logit_lens(lens, engine.tokenizer)
    cells = [t.get_text() for t in fig.axes[0].texts]
    assert len(cells) == 30
    assert cells[20:] == [engine.tokenizer.decode([int(i)])[:8] for i in result.big_topk.ids[:, 0]]


def test_figures_render_to_png(result, vector):
    buf = io.BytesIO()
    plot_projection(result, vector).savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_steps_is_a_clear_error(engine, vector):
    orch = CognitiveOrchestrator(engine, mixes=Mix.of(vector), judges=[Always()])
    empty = orch.generate("Hi", max_new_tokens=1)
    empty.steps.clear()
    with pytest.raises(BadArgumentError, match="no steps"):
        plot_judges(empty)
