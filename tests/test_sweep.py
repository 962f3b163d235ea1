"""The sweep's scores on the real embedded model: perplexity from one verify pass equals
the token-by-token value; a collapsed text ranks below a coherent one although its
perplexity is lower; an interrupted row is marked, not NaN; the plot's axis, labels and
glyphs."""
from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from max_jupyter.evaluation import degeneracy
from max_jupyter.jupyter import sweep as sweep_module
from max_jupyter.jupyter.plots import plot_sweep
from max_jupyter.jupyter.render import token_pieces
from max_jupyter.jupyter.sweep import Sweep, SweepRow, perplexity
from max_jupyter.orchestrator.trace import GenerationResult

PROMPT = "Describe the sea."
COHERENT = (" The sea is a vast and restless body of salt water. Waves roll in from the horizon, "
            "grey under a low sky, and gulls call over the harbour.")
REPEATED = " sea" * 30
EMOJI = " \U0001f30a\U0001f973\U0001f389" * 10  # the wave is in the font; the others are not


@pytest.fixture(scope="module")
def prompt_ids(engine):
    return engine.tokenizer.chat(PROMPT)


def encode(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=False)


def stepwise_perplexity(engine, prompt_ids, token_ids) -> float:
    """The reference: one step per token, each step's logits scoring the next token."""
    nll, logits = 0.0, engine.prefill(prompt_ids).logits
    for i, token in enumerate(token_ids):
        nll -= float(torch.log_softmax(logits.float(), -1)[token])
        if i + 1 < len(token_ids):
            logits = engine.step(token).logits
    engine.reset()
    return math.exp(nll / len(token_ids))


def test_perplexity_in_one_pass_equals_token_by_token(engine, prompt_ids, monkeypatch):
    tokens = encode(engine, COHERENT)
    expected = stepwise_perplexity(engine, prompt_ids, tokens)
    for chunk, passes in ((sweep_module.SCORE_CHUNK, 2), (8, 1 + math.ceil((len(tokens) - 1) / 8))):
        monkeypatch.setattr(sweep_module, "SCORE_CHUNK", chunk)
        calls = engine.forward_calls
        assert perplexity(engine, prompt_ids, tokens) == pytest.approx(expected, rel=1e-4)
        assert engine.forward_calls - calls == passes and engine.seq_len == 0
    monkeypatch.setattr(engine, "supports_verify", False)  # a backend without verify steps
    calls = engine.forward_calls
    assert perplexity(engine, prompt_ids, tokens) == pytest.approx(expected, rel=1e-4)
    assert engine.forward_calls - calls == len(tokens)
    assert math.isnan(perplexity(engine, prompt_ids, []))


def row(engine, prompt_ids, coef: float, text: str, finish_reason: str = "length") -> SweepRow:
    """A row as ``run_sweep`` makes it, for a planted text."""
    ids = encode(engine, text)
    result = GenerationResult(prompt_ids=list(prompt_ids), token_ids=ids, text=text,
                              finish_reason=finish_reason)
    out = SweepRow(coef, result, degeneracy(token_pieces(engine.tokenizer, ids)))
    if finish_reason != "interrupted":
        out.perplexity = perplexity(engine, prompt_ids, ids)
    return out


@pytest.fixture(scope="module")
def sweep(engine, prompt_ids):
    return Sweep("happy", PROMPT, [row(engine, prompt_ids, -2.0, EMOJI),
                                   row(engine, prompt_ids, 0.0, COHERENT),
                                   row(engine, prompt_ids, 2.0, REPEATED),
                                   row(engine, prompt_ids, 4.0, COHERENT[:40], "interrupted")])


def scored_only(sweep: Sweep) -> Sweep:
    """``sweep`` without its interrupted row: the last scored point at the right edge."""
    return Sweep(sweep.spec, sweep.prompt, [r for r in sweep.rows if not r.interrupted])


def test_a_collapsed_row_ranks_below_a_coherent_one(sweep):
    emoji, coherent, repeated, interrupted = sweep.rows
    assert repeated.perplexity < coherent.perplexity  # perplexity alone would prefer the collapse
    assert [r.status for r in sweep.rows] == ["collapsed", "ok", "collapsed", "interrupted"]
    assert sweep.ranked()[0] is coherent and sweep.ranked()[-1] is interrupted
    assert sorted(r.coef for r in sweep.ranked()[1:3]) == [emoji.coef, repeated.coef]


def test_an_interrupted_row_is_marked_not_nan(sweep):
    interrupted = sweep.rows[-1]
    assert interrupted.perplexity is None and interrupted.interrupted
    assert math.isnan(sweep.perplexities[-1]) and torch.isfinite(sweep.perplexities[:-1]).all()
    html = sweep._repr_html_()
    assert "nan" not in html.lower() and html.count("<td>interrupted</td>") == 2  # perplexity, status
    assert html.count("<tr>") == 5 and "<td>collapsed</td>" in html
    assert "nan" not in repr(interrupted) and "perplexity=interrupted" in repr(interrupted)


def drawn(sweep: Sweep):
    """The sweep's figure, drawn with every warning an error (a glyph missing from the font
    warns), and its renderer."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_sweep(sweep)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
    return fig, canvas.get_renderer()


def assert_nothing_cut(fig, renderer) -> None:
    """Each point's label lies within its axes, every axes (ticks, titles, legend) within the figure."""
    inside = [(t.get_window_extent(renderer), ax.bbox) for ax in fig.axes for t in ax.texts]
    inside += [(ax.get_tightbbox(renderer), fig.bbox) for ax in fig.axes]
    for box, frame in inside:
        assert (box.x0 >= frame.x0 - 1 and box.x1 <= frame.x1 + 1 and box.y0 >= frame.y0 - 1
                and box.y1 <= frame.y1 + 1), f"cut off: {box} outside {frame}"


def test_sweep_plot_marks_collapse_and_interruption_with_whole_labels(sweep):
    fig, renderer = drawn(sweep)
    top, bottom = fig.axes[:2]
    scored = [r for r in sweep.rows if not r.interrupted]
    xs, ys = top.get_lines()[0].get_data()
    assert list(xs) == [r.coef for r in scored] and list(ys) == [r.perplexity for r in scored]
    crossed = [l for l in top.get_lines() if l.get_label().startswith("collapsed")]
    assert list(crossed[0].get_xdata()) == [-2.0, 2.0]
    assert [l.get_xdata()[0] for l in top.get_lines() if l.get_label() == "interrupted"] == [4.0]
    assert list(bottom.get_lines()[0].get_ydata()) == [r.degeneracy.score for r in sweep.rows]
    assert len(top.texts) == len(scored)
    assert_nothing_cut(fig, renderer)
    assert_nothing_cut(*drawn(scored_only(sweep)))  # the last point's label at the right edge


@pytest.mark.parametrize("values, scale", [((1.84, 1.93), "linear"), ((2.0, 80.0), "log")])
def test_sweep_plot_axis_is_linear_unless_the_range_is_wide(sweep, values, scale):
    rows = [dataclasses.replace(sweep.rows[1], coef=float(i), perplexity=v) for i, v in enumerate(values)]
    assert plot_sweep(Sweep("happy", PROMPT, rows)).axes[0].get_yscale() == scale


def test_a_row_without_tokens_reads_no_tokens_and_ranks_after_scored_rows(engine, prompt_ids, sweep):
    empty = row(engine, prompt_ids, 6.0, "")
    assert math.isnan(empty.perplexity) and empty.status == "ok"
    ranked = Sweep("happy", PROMPT, [empty, *sweep.rows[:2]]).ranked()
    assert ranked[0] is sweep.rows[1] and ranked[1] is empty  # after the scored row, before collapse
    assert "perplexity=no tokens" in repr(empty)
