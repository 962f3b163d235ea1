"""Rendering of a ``GenerationResult`` for notebooks: HTML (tokens coloured by a judge's
score, steered and re-run tokens marked, a tooltip per token with both models' top-k
alternatives, a one-line summary) and the plain-text ``_repr_pretty_`` form.

Token texts need the model's tokenizer, which a result does not hold; without one the HTML
shows the text as a whole.
"""
from __future__ import annotations

import html
import math

from max_jupyter.orchestrator.trace import GenerationResult, StepRecord, TopK
from max_jupyter.tokenizer import Tokenizer, token_pieces  # noqa: F401 (also imported from here)

STYLE = """<style>
.mj-result{font-family:var(--jp-content-font-family,sans-serif);line-height:1.7}
.mj-text{white-space:pre-wrap;font-family:var(--jp-code-font-family,monospace);font-size:13px;
line-height:1.45}
.mj-tok.mj-nl::before{content:"\21b5";color:#bbb;font-size:10px}
.mj-tok{border-radius:2px}
.mj-tok.mj-steered{border-bottom:2px solid #2a9d8f}
.mj-tok.mj-rerun{outline:1px dashed #d62828}
.mj-tok.mj-changed::after{content:"\\21bb";font-size:9px;vertical-align:super;color:#d62828}
.mj-summary{font-size:12px;color:#555;margin-top:4px}
.mj-legend{font-size:11px;color:#777}
</style>"""


def speculation(result: GenerationResult) -> str | None:
    """Speculative decoding in words: accepted/drafted tokens and the acceptance rate when
    the small model drafted, why it was off when asked for but off, else None."""
    if result.speculate_off is not None:
        return f"speculation off: {result.speculate_off}"
    if not result.drafted_tokens:
        return None
    return (f"speculation: drafted {result.drafted_tokens}, accepted {result.accepted_tokens} "
            f"({result.acceptance_rate:.0%} acceptance)")


def mix_words(coefs: dict[str, float]) -> str:
    """A live mix's coefficients for people: ``joy +0.40, calm -0.05`` (two decimals, so a
    slider's float noise such as ``-0.050000000000000044`` never shows), or ``empty``."""
    return ", ".join(f"{name} {coef:+.2f}" for name, coef in coefs.items()) or "empty"


def summary(result: GenerationResult) -> str:
    """One line: tokens, speed, finish reason, the live mix at the start, steered / re-run
    steps, speculation, judges' score ranges."""
    n = len(result.steps)
    parts = [f"{len(result.token_ids)} tokens", f"{result.tokens_per_s:.1f} tok/s",
             f"finish: {result.finish_reason}", f"live mix at start: {mix_words(result.start_mix)}"]
    if n:
        steered = int(result.steered.sum())
        reruns = [r for r in result.steps if r.rerun]
        parts.append(f"steered {steered}/{n} steps")
        if reruns:
            parts.append(f"re-run {len(reruns)} (changed {sum(r.changed for r in reruns)})")
    spec = speculation(result)
    if spec is not None:
        parts.append(spec)
    for name, scores in result.scores.items():
        finite = scores[~scores.isnan()]
        if len(finite):
            parts.append(f"{name} {float(finite.min()):.2f}..{float(finite.max()):.2f}")
    return " · ".join(parts)


def pretty(result: GenerationResult, p, cycle: bool) -> None:
    """IPython's ``_repr_pretty_`` for a result: the summary line, then the text."""
    if cycle:
        p.text("GenerationResult(...)")
        return
    p.text(f"GenerationResult({summary(result)})")
    if result.text:
        p.break_()
        p.text(result.text)


def _topk_line(label: str, topk: TopK | None, step: int, tokenizer: Tokenizer | None) -> str:
    if topk is None or step >= len(topk.ids) or tokenizer is None:
        return ""
    alts = ", ".join(f"{tokenizer.token_text(int(t))!r} {float(l):.1f}"
                     for t, l in zip(topk.ids[step][:5], topk.logits[step][:5]))
    return f"\n{label} top-k (logit): {alts}"


def _tooltip(result: GenerationResult, record: StepRecord, piece: str, tokenizer: Tokenizer,
             small_tokenizer: Tokenizer | None) -> str:
    shown = repr(piece) if piece else f"'' (part of a character: {tokenizer.token_text(record.token)})"
    lines = (f"step {record.step} · {shown} p={record.model_prob:.2f} (model; sampler "
             f"{record.sampler_prob:.2f})")
    if record.scores:
        lines += "\nscores: " + ", ".join(f"{k}={v:.3g}" for k, v in record.scores.items())
    if record.mixes_on:
        lines += "\njudge-gated mixes: " + ", ".join(record.mixes_on)
    if record.live_coefs:
        lines += "\nlive mix: " + mix_words(record.live_coefs)
    if record.drafted:
        lines += (f"\nspeculation: a draft of {len(record.drafted)} token(s) from here, "
                  f"{record.accepted} accepted")
    if record.rerun:
        was = (tokenizer.token_text(record.unsteered_token) if record.unsteered_token is not None
               else "?")
        lines += (f"\nre-run: first pass chose {was!r} p={record.unsteered_prob or 0:.2f}"
                  + (" (changed)" if record.changed else " (same token)"))
    lines += _topk_line("big", result.big_topk, record.step, tokenizer)
    lines += _topk_line("small", result.small_topk, record.step, small_tokenizer)
    return lines


def _shade(score: float, low: float, high: float) -> str:
    if math.isnan(score):
        return ""
    x = 0.5 if high <= low else (score - low) / (high - low)
    return f"background:rgba(244,162,97,{0.08 + 0.62 * x:.2f})"


def token_spans(result: GenerationResult, tokenizer: Tokenizer,
                small_tokenizer: Tokenizer | None = None, judge: str | None = None) -> str:
    """The result's text as one ``<span>`` per token, shaded by ``judge``'s score (the first
    judge by default; min..max of its scores maps to light..dark), marked when steered or
    re-run, each with a tooltip."""
    scores = result.scores
    judge = judge if judge is not None else next(iter(scores), None)
    values = scores.get(judge)
    finite = values[~values.isnan()] if values is not None else None
    low, high = ((float(finite.min()), float(finite.max())) if finite is not None and len(finite)
                 else (0.0, 0.0))
    pieces = token_pieces(tokenizer, result.token_ids)
    steered = result.steered.tolist()
    spans = []
    for record, piece in zip(result.steps, pieces):
        classes = ["mj-tok"] + (["mj-steered"] if steered[record.step] else []) + \
                  (["mj-rerun"] if record.rerun else []) + (["mj-changed"] if record.changed else []) + \
                  (["mj-nl"] if "\n" in piece and not piece.strip() else [])  # a faint ↵ to hover
        style = _shade(float(values[record.step]), low, high) if values is not None else ""
        tip = _tooltip(result, record, piece, tokenizer, small_tokenizer)
        spans.append(f'<span class="{" ".join(classes)}" style="{style}" '
                     f'title="{html.escape(tip)}">{html.escape(piece)}</span>')
    return "".join(spans)


def result_html(result: GenerationResult, tokenizer: Tokenizer | None = None,
                small_tokenizer: Tokenizer | None = None, judge: str | None = None) -> str:
    """The whole HTML view of a result (see the module)."""
    if tokenizer is not None and result.steps:
        body = token_spans(result, tokenizer, small_tokenizer or tokenizer, judge)
    else:
        body = html.escape(result.text)
    shaded = judge or next(iter(result.scores), None)
    legend = ('<div class="mj-legend"><span class="mj-tok mj-steered">steered</span> · '
              '<span class="mj-tok mj-rerun">re-run</span> · ↻ re-run changed the token'
              + (f" · shade: {html.escape(shaded)} score" if shaded else "")
              + " · hover a token for its scores and top-k</div>")
    return (f'{STYLE}<div class="mj-result"><div class="mj-text">{body}</div>'
            f'<div class="mj-summary">{html.escape(summary(result))}</div>{legend}</div>')
