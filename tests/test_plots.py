"""Plots of a real trace: each call returns a Figure whose data are the trace's numbers."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Polygon, Rectangle

from max_jupyter.errors import BadArgumentError
from max_jupyter.jupyter.lens import logit_lens
from max_jupyter.jupyter.plots import (
    divergence,
    plot_divergence,
    plot_judges,
    plot_logit_lens,
    plot_projection,
    plot_text,
)
from max_jupyter.jupyter.render import token_pieces
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
            xs = (patch.get_xy()[:, 0] if isinstance(patch, Polygon)
                  else [patch.get_x(), patch.get_x() + patch.get_width()])
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
    assert lens.token_ids == tuple(r.token for r in result.steps)
    fig = plot_logit_lens(lens, engine.tokenizer)
    cells = [t.get_text() for t in fig.axes[0].texts]
    assert len(cells) == 30
    assert cells[20:] == [plot_text(engine.tokenizer.decode([int(i)]), 8) for i in result.big_topk.ids[:, 0]]
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "".join(ticks) == plot_text(result.text)  # the tokens written, not step numbers


def test_logit_lens_plot_draws_every_step_or_says_what_is_cut(engine):
    """40 steps: two panels, every step a column labelled with its token; past
    ``MAX_LENS_STEPS`` (here lowered to 16) the title names the steps shown and how to see the rest."""
    orch = CognitiveOrchestrator(engine)
    long = orch.generate("Write a short story about a cat.", max_new_tokens=40, ignore_eos=True,
                         trace=TraceConfig(big_layers=(5, 29)))
    lens = logit_lens(engine, long, k=1)
    assert lens.steps == 40
    fig = plot_logit_lens(lens, engine.tokenizer)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [len(ax.get_xticklabels()) for ax in panels] == [32, 8]
    assert sum(len(ax.texts) for ax in panels) == 2 * 40
    ticks = [t.get_text() for ax in panels for t in ax.get_xticklabels()]
    assert ticks == [plot_text(p, 16) for p in token_pieces(engine.tokenizer, long.token_ids)]
    assert "40 steps" in fig._suptitle.get_text()
    part = plot_logit_lens(lens, engine.tokenizer, steps=slice(8, 24))
    title = part._suptitle.get_text()
    assert "steps 8–23 of 40 shown" in title and "steps=slice(0, 8) or steps=slice(24, 40)" in title
    with pytest.raises(BadArgumentError, match="selects none"):
        plot_logit_lens(lens, engine.tokenizer, steps=slice(40, 50))


def test_plot_text_is_drawn_without_glyph_warnings():
    """Emoji the font lacks become a square, control characters and ``$`` are escaped, so
    drawing the text warns of nothing (matplotlib warns once per missing glyph)."""
    text = "Joy! \U0001f973\U0001f389\U0001fae0 costs $5 and $6\n\tnext\x07"
    safe = plot_text(text)
    assert safe == "Joy! \u25a1\u25a1\u25a1 costs \\$5 and \\$6\\n\\tnext\\x07"
    fig = Figure()
    fig.text(0.1, 0.5, safe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.savefig(io.BytesIO(), format="png")
    raw = Figure()
    raw.text(0.1, 0.5, "\U0001f973")
    with pytest.warns(UserWarning, match="missing from font"):  # the check above can fail
        raw.savefig(io.BytesIO(), format="png")


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
