"""Plots of a generation's trace (matplotlib; one call each, each returning the ``Figure``).

Figures are made without pyplot (nothing is shown twice, nothing leaks into pyplot's
state); in IPython the PNG formatter for figures is registered so a returned figure shows.
Steered steps are shaded in every per-step plot.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from matplotlib import font_manager, rcParams
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

from max_jupyter.errors import BadArgumentError
from max_jupyter.jupyter.render import token_pieces
from max_jupyter.orchestrator.trace import GenerationResult, TopK
from max_jupyter.steering.vector import SteeringVector
from max_jupyter.tokenizer import Tokenizer

if TYPE_CHECKING:
    from max_jupyter.evaluation.result import Evaluation
    from max_jupyter.jupyter.lens import LogitLens
    from max_jupyter.jupyter.sweep import Sweep

MAX_TICKS = 48
LENS_COLUMNS = 32  # steps per panel of the logit lens (a longer result gets more panels)
MAX_LENS_STEPS = 256  # steps one lens figure draws (8 panels); the title says how to see more
ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "$": "\\$"}  # "$" would start mathtext
MISSING_GLYPH = "\u25a1"  # white square, in DejaVu Sans
LOG_SPAN = 10.0  # a sweep's perplexity axis turns logarithmic when its values span more


def figure(width: float = 8.0, height: float = 3.2) -> Figure:
    """A new figure with one axes; registers the PNG formatter in IPython if needed."""
    _show_figures_in_ipython()
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.add_subplot()
    return fig


def _show_figures_in_ipython() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    if Figure in shell.display_formatter.formatters["image/png"].type_printers:
        return
    from IPython.core.pylabtools import select_figure_formats

    select_figure_formats(shell, {"png"})


@functools.cache
def _font_glyphs() -> frozenset[int]:
    """Code points the sans-serif fonts matplotlib draws with (its fallback chain) cover."""
    points: set[int] = set()
    for family in rcParams["font.sans-serif"]:
        try:
            path = font_manager.findfont(FontProperties(family=family), fallback_to_default=False)
        except ValueError:
            continue  # not installed here
        points.update(font_manager.get_font(path).get_charmap())
    return frozenset(points)


def plot_text(text: str, limit: int | None = None) -> str:
    """``text`` as it can be drawn: newlines, tabs and ``$`` escaped, other control
    characters as ``\\xNN``, characters no font here has (most emoji) as a white square,
    so matplotlib warns of no missing glyph; cut to ``limit`` characters (``…`` marks a cut)."""
    glyphs = _font_glyphs()
    out = "".join(ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 32 else
                                     c if ord(c) in glyphs or c == " " else MISSING_GLYPH)
                  for c in text)
    return out if limit is None or len(out) <= limit else out[:limit - 1] + "…"


def _shade_steered(ax, result: GenerationResult) -> None:
    """Shade the spans of steered steps (x = step index)."""
    steered = result.steered.tolist()
    start = None
    for i, on in enumerate([*steered, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            ax.axvspan(start - 0.5, i - 0.5, color="#2a9d8f", alpha=0.15, lw=0,
                       label="steered" if start == steered.index(True) else None)
            start = None


def _token_ticks(ax, result: GenerationResult, tokenizer: Tokenizer | None) -> None:
    n = len(result.steps)
    ax.set_xlabel("step")
    if tokenizer is None or n == 0 or n > MAX_TICKS:
        return
    pieces = token_pieces(tokenizer, result.token_ids) + ["<eos>"] * (n - len(result.token_ids))
    ax.set_xticks(range(n), [plot_text(p) for p in pieces[:n]], rotation=90, fontsize=7)


def _need_steps(result: GenerationResult) -> None:
    if not result.steps:
        raise BadArgumentError("this result has no steps to plot; generate at least one token.")


def plot_projection(result: GenerationResult, vector: SteeringVector, layers: Sequence[int] | None = None,
                    *, small: bool = False, tokenizer: Tokenizer | None = None) -> Figure:
    """Scalar projection ``h · v / |v|`` of each step's hidden state on ``vector``, one line
    per layer (default: every layer both the trace and the vector have). ``small``: use the
    small model's states (``result.small_hidden``) instead of the big model's."""
    _need_steps(result)
    hidden = result.small_hidden if small else result.big_hidden
    which = "small" if small else "big"
    layers = [l for l in vector.layers if l in hidden] if layers is None else list(layers)
    missing = [l for l in layers if l not in hidden or l not in vector.directions]
    if not layers or missing:
        raise BadArgumentError(
            f"plot_projection: layer(s) {missing or list(vector.layers)} are not both in the trace's "
            f"{which}_hidden ({sorted(hidden)}) and the vector ({list(vector.layers)}); capture them "
            f"(--capture / TraceConfig({which}_layers=...)).")
    fig = figure()
    ax = fig.axes[0]
    for layer in layers:
        v = vector.directions[layer]
        proj = hidden[layer].float().cpu() @ (v / v.norm())  # [steps]
        ax.plot(range(len(proj)), proj.numpy(), marker=".", label=f"layer {layer}")
    _shade_steered(ax, result)
    _token_ticks(ax, result, tokenizer)
    ax.set_ylabel(f"projection on {vector.label or 'vector'}")
    ax.set_title(f"{which} model hidden states projected on {vector.label or 'the vector'}")
    ax.legend(fontsize=8)
    return fig


def plot_judges(result: GenerationResult, judge: str | None = None, threshold: float | None = None,
                *, tokenizer: Tokenizer | None = None) -> Figure:
    """Each judge's score over steps (or only ``judge``), ``threshold`` as a line, steered
    steps shaded and re-run steps marked."""
    _need_steps(result)
    scores = result.scores
    if judge is not None and judge not in scores:
        raise BadArgumentError(f"plot_judges: no judge {judge!r} in this result; it has {sorted(scores)}.")
    if not scores:
        raise BadArgumentError("plot_judges: this result has no judge scores; generate with a judge.")
    fig = figure()
    ax = fig.axes[0]
    for name, values in scores.items():
        if judge is None or name == judge:
            ax.plot(range(len(values)), values.numpy(), marker=".", label=name)
    reruns = [r.step for r in result.steps if r.rerun]
    if reruns and judge is not None:
        ax.plot(reruns, scores[judge][reruns].numpy(), "x", color="#d62828", label="re-run")
    if threshold is not None:
        ax.axhline(threshold, color="#444", ls="--", lw=1, label=f"threshold {threshold:g}")
    _shade_steered(ax, result)
    _token_ticks(ax, result, tokenizer)
    ax.set_ylabel("score")
    ax.set_title("judge scores per step")
    ax.legend(fontsize=8)
    return fig


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def divergence(result: GenerationResult) -> dict[str, torch.Tensor]:
    """Per-step ``[steps]`` entropies of both models' next-token distributions and
    KL(big || small): exact from full logits (``TraceConfig(full_logits=True)``, same
    vocabulary for KL); otherwise entropies over the top-k only (keys end in ``(top-k)``)."""
    out: dict[str, torch.Tensor] = {}
    if result.big_logits is not None:
        out["entropy big"] = _entropy(result.big_logits)
        if result.small_logits is not None:
            out["entropy small"] = _entropy(result.small_logits)
            n = min(result.big_logits.shape[-1], result.small_logits.shape[-1])
            logp = torch.log_softmax(result.big_logits[:, :n].float(), -1)
            logq = torch.log_softmax(result.small_logits[:, :n].float(), -1)
            out["KL(big||small)"] = (logp.exp() * (logp - logq)).sum(-1)
        return out
    for name, topk in (("big", result.big_topk), ("small", result.small_topk)):
        if isinstance(topk, TopK) and len(topk.logits):
            out[f"entropy {name} (top-k)"] = _entropy(topk.logits)
    return out


def plot_divergence(result: GenerationResult, *, tokenizer: Tokenizer | None = None) -> Figure:
    """Entropy of the big and small models' next-token distributions and KL(big || small)
    over steps (see ``divergence`` for what is exact), steered steps shaded."""
    _need_steps(result)
    fig = figure()
    ax = fig.axes[0]
    for name, values in divergence(result).items():
        ax.plot(range(len(values)), values.numpy(), marker=".", label=name)
    _shade_steered(ax, result)
    _token_ticks(ax, result, tokenizer)
    ax.set_ylabel("nats")
    ax.set_title("big vs small: entropy and divergence per step")
    ax.legend(fontsize=8)
    return fig


def plot_logit_lens(lens: LogitLens, tokenizer: Tokenizer, *, steps: slice | None = None) -> Figure:
    """The logit lens as a grid: rows are captured layers, columns steps, labelled with the
    token each step wrote; each cell shows the top token through the final norm and
    unembedding, coloured by its probability. Every step is drawn, ``LENS_COLUMNS`` to a
    panel, up to ``MAX_LENS_STEPS``; beyond that the title says which steps are shown and
    how to see the rest (``steps=slice(start, stop)`` picks them)."""
    if lens.steps == 0:
        raise BadArgumentError("plot_logit_lens: the lens has no steps; generate at least one token.")
    if steps is None:
        steps = slice(0, MAX_LENS_STEPS)
    if not isinstance(steps, slice) or steps.step not in (None, 1):
        raise BadArgumentError(f"plot_logit_lens: steps={steps!r} is not a slice of consecutive steps; "
                               f"pass e.g. steps=slice(0, 64).")
    first, stop, _ = steps.indices(lens.steps)
    shown = range(first, max(first, stop))
    if not shown:
        raise BadArgumentError(f"plot_logit_lens: steps={steps!r} selects none of the lens's "
                               f"{lens.steps} steps; pass e.g. steps=slice(0, {lens.steps}).")
    panels = [shown[i:i + LENS_COLUMNS] for i in range(0, len(shown), LENS_COLUMNS)]
    n_layers = len(lens.layers)
    fig = Figure(figsize=(0.5 * len(panels[0]) + 2.2, (0.36 * n_layers + 1.3) * len(panels)),
                 layout="constrained")
    _show_figures_in_ipython()
    labels = token_pieces(tokenizer, lens.token_ids)
    for panel, axes in zip(panels, fig.subplots(len(panels), 1, squeeze=False)[:, 0]):
        image = _lens_panel(axes, lens, tokenizer, panel, labels)
        axes.set_xlim(-0.5, len(panels[0]) - 0.5)  # a short last panel keeps the column width
    fig.colorbar(image, ax=fig.axes, label="probability", shrink=min(1.0, 3 / len(panels)))
    fig.suptitle(_lens_title(lens.steps, shown))
    return fig


def _lens_panel(ax, lens: LogitLens, tokenizer: Tokenizer, steps: range, labels: list[str]):
    """One panel of the lens over ``steps``; returns its image (for the colorbar)."""
    probs = lens.probs[:, steps.start:steps.stop, 0]  # [layers, steps]
    ids = lens.ids[:, steps.start:steps.stop, 0]
    image = ax.imshow(probs.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1)
    for i in range(len(lens.layers)):
        for j in range(len(steps)):
            ax.text(j, i, plot_text(tokenizer.decode([int(ids[i, j])]), 8), ha="center", va="center",
                    fontsize=7, color="white" if probs[i, j] > 0.6 else "black")
    ax.set_yticks(range(len(lens.layers)), [str(l) for l in lens.layers])
    ticks = [plot_text(labels[s] or tokenizer.decode([lens.token_ids[s]]), 16) for s in steps]
    ax.set_xticks(range(len(steps)), ticks, rotation=90, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_xlabel(f"token written at steps {steps.start}–{steps.stop - 1}")
    return image


def _lens_title(total: int, shown: range) -> str:
    title = "logit lens: top token per layer and step"
    if len(shown) == total:
        return f"{title} ({total} steps)"
    rest = [f"steps=slice(0, {shown.start})"] if shown.start else []
    rest += [f"steps=slice({shown.stop}, {total})"] if shown.stop < total else []
    return (f"{title}: steps {shown.start}–{shown.stop - 1} of {total} shown; "
            f"see the rest with {' or '.join(rest)}")


def plot_sweep(sweep: Sweep) -> Figure:
    """A sweep as a chart. Above: the unsteered model's perplexity of each row's text against
    the coefficient (a linear axis unless the values span more than ``LOG_SPAN`` times),
    collapsed rows crossed, each point labelled with the start of its text. Below: each
    text's degeneracy score, with the threshold above which a row counts as collapsed.
    An interrupted row has no perplexity; a dotted line marks its coefficient."""
    from max_jupyter.evaluation.degeneracy import COLLAPSED

    if not sweep.rows:
        raise BadArgumentError("plot_sweep: the sweep has no rows.")
    _show_figures_in_ipython()
    fig = Figure(figsize=(8.0, 5.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    scored = [r for r in sweep.rows if not r.interrupted]
    top.plot([r.coef for r in scored], [r.perplexity for r in scored], marker="o", label="perplexity")
    collapsed = [r for r in scored if r.status == "collapsed"]
    if collapsed:
        top.plot([r.coef for r in collapsed], [r.perplexity for r in collapsed], "x", color="#d62828",
                 ms=10, mew=2, label=f"collapsed (degeneracy ≥ {COLLAPSED:g}): ranked last")
    values = [r.perplexity for r in scored]
    if values and max(values) > LOG_SPAN * min(values):
        top.set_yscale("log")
    _label_points(top, scored, [r.coef for r in sweep.rows])
    bottom.plot(sweep.coefs, [r.degeneracy.score for r in sweep.rows], marker="o", color="#6a4c93")
    for row in (r for r in sweep.rows if r.interrupted):
        for ax in (top, bottom):
            ax.axvline(row.coef, ls=":", color="#888", label="interrupted" if ax is top else None)
    top.margins(x=0.08, y=0.25)
    top.set_ylabel("perplexity (unsteered)")
    top.set_title(f"steering sweep of {plot_text(sweep.spec)}")
    top.legend(fontsize=7, loc="best")
    bottom.axhline(COLLAPSED, color="#d62828", ls="--", lw=1)
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("degeneracy")
    bottom.set_xlabel(f"coefficient of {plot_text(sweep.spec)}")
    return fig


def _label_points(ax, rows, coefs: list[float]) -> None:
    """The start of each row's text next to its point: left of the point in the right half
    of the range (so no label runs off the axes), alternately above and below."""
    middle = (min(coefs) + max(coefs)) / 2
    for i, row in enumerate(rows):
        right = row.coef > middle
        ax.annotate(plot_text(" ".join(row.text.split()), 18), (row.coef, row.perplexity),
                    fontsize=6, xytext=(-3 if right else 3, 6 if i % 2 == 0 else -11),
                    textcoords="offset points", ha="right" if right else "left")


BASELINE_MARKS = {"none": ("s", "#555555"), "prompting": ("*", "#2a9d8f"),
                  "random": ("^", "#e76f51"), "flipped": ("v", "#6a4c93")}


def plot_evaluation(ev: Evaluation) -> Figure:
    """An evaluation as a chart: the mean concept score against the mean fluency score of the
    vector's answers at each coefficient (all prompts; a line in coefficient order, each
    point labelled, the chosen coefficient ringed), and each baseline's point marked (no
    steering, prompting, and the random and flipped controls on the test split)."""
    if not ev.rows:
        raise BadArgumentError("plot_evaluation: the evaluation has no scored answers.")
    fig = figure(6.0, 4.5)
    (ax,) = fig.axes
    steered = [(c, ev.means("steered", c)) for c in ev.coefs if ev.select("steered", c)]
    ax.plot([m["fluency"] for _, m in steered], [m["concept"] for _, m in steered], marker="o",
            color="#1d3557", label=f"{plot_text(ev.vector)} by coefficient")
    for c, m in steered:
        ax.annotate(f"{c:+g}", (m["fluency"], m["concept"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    chosen = ev.chosen_coef
    if chosen is not None:
        m = ev.means("steered", chosen)
        ax.plot([m["fluency"]], [m["concept"]], "o", ms=14, mfc="none", mec="#d62828",
                label=f"chosen on the eval split ({chosen:+g})")
    for condition, (marker, colour) in BASELINE_MARKS.items():
        if ev.select(condition):
            m = ev.means(condition)
            ax.plot([m["fluency"]], [m["concept"]], marker, ms=11, color=colour, ls="none",
                    label=condition if condition in ("none", "prompting") else f"{condition} control")
    ax.set_xlim(-0.05, 2.05)
    ax.set_ylim(-0.05, 2.05)
    ax.set_xlabel("fluency (0-2)")
    ax.set_ylabel(f"concept: {plot_text(ev.concept)} (0-2)")
    ax.set_title(f"evaluation of {plot_text(ev.vector)} (probe AUROC {ev.probe_auroc:.2f})")
    ax.legend(fontsize=7, loc="lower left")
    return fig
