"""The HTML and pretty views of a real GenerationResult (embedded model, two judges)."""
from __future__ import annotations

import html
import re

import pytest
import torch

from max_jupyter.jupyter.render import pretty, result_html, summary, token_pieces
from max_jupyter.orchestrator import CognitiveOrchestrator, DivergenceJudge, ProbeJudge, TraceConfig
from max_jupyter.orchestrator.trace import GenerationResult, StepRecord
from max_jupyter.steering import Mix


@pytest.fixture(scope="module")
def result(engine, small, vector) -> GenerationResult:
    """12 steps with a pre-step probe judge on the small model (same weights, so the big
    model's vector fits it) and a post-step entropy judge that re-runs uncertain steps."""
    mix = Mix(engine.identity)
    mix.set("happy", vector, 2.0)
    probe = ProbeJudge(vector, layer=10, threshold=-1e9, hysteresis=0.0)  # fires from step 0
    orch = CognitiveOrchestrator(engine, small, mixes=mix,
                                 judges=[probe, DivergenceJudge(threshold=2.0)])
    out = orch.generate("Tell me about rain.", max_new_tokens=12, ignore_eos=True,
                        trace=TraceConfig(big_layers=(10, 15)))
    return out


def spans(markup: str) -> list[tuple[str, str, str]]:
    """(class, title, text) of every token span."""
    return re.findall(r'<span class="(mj-tok[^"]*)" style="[^"]*" title="([^"]*)">([^<]*)</span>', markup)


def test_pieces_add_up_to_the_text(result, engine):
    assert "".join(token_pieces(engine.tokenizer, result.token_ids)) == result.text


def test_html_has_one_marked_span_per_token(result, engine, small):
    markup = result_html(result, engine.tokenizer, small.tokenizer)
    found = spans(markup)
    assert len(found) == len(result.token_ids) == 12
    assert "".join(html.unescape(text) for _, _, text in found) == result.text
    steered = [bool(r.mixes_on) for r in result.steps]
    assert [("mj-steered" in cls) for cls, _, _ in found] == steered
    assert any(steered)
    assert [("mj-rerun" in cls) for cls, _, _ in found] == [r.rerun for r in result.steps]
    assert [("mj-changed" in cls) for cls, _, _ in found] == [r.changed for r in result.steps]


def test_tooltips_hold_scores_and_both_models_top_k(result, engine, small):
    found = spans(result_html(result, engine.tokenizer, small.tokenizer))
    for (_, title, _), record in zip(found, result.steps):
        title = html.unescape(title)
        assert f"step {record.step} " in title
        for name, score in record.scores.items():
            assert f"{name}={score:.3g}" in title
        best_big = engine.tokenizer.decode([int(result.big_topk.ids[record.step, 0])])
        best_small = small.tokenizer.decode([int(result.small_topk.ids[record.step, 0])])
        assert f"big top-k (logit): {best_big!r}" in title
        assert f"small top-k (logit): {best_small!r}" in title
        if record.rerun:
            assert "re-run: first pass chose" in title


def test_tokens_shaded_by_the_first_judges_score(result, engine):
    markup = result_html(result, engine.tokenizer)
    alphas = [float(a) for a in re.findall(r"background:rgba\(244,162,97,([0-9.]+)\)", markup)]
    scores = result.scores[next(iter(result.scores))][: len(result.token_ids)]
    assert len(alphas) == len(scores)
    assert alphas.index(max(alphas)) == int(scores.argmax())
    assert alphas.index(min(alphas)) == int(scores.argmin())


def test_summary_line(result):
    line = summary(result)
    assert "\n" not in line
    assert line.startswith(f"{len(result.token_ids)} tokens · ")
    assert f"finish: {result.finish_reason}" in line
    steered = int(result.steered.sum())
    assert f"steered {steered}/{len(result.steps)} steps" in line
    if result.reruns.any():
        assert f"re-run {int(result.reruns.sum())} " in line
    assert f"<div class=\"mj-summary\">{html.escape(line)}</div>" in result_html(result)


def test_summary_says_which_live_mix_the_generation_began_with(engine, vector):
    """The live mix (``steering=``, first) at step 0, rounded to two decimals in words:
    ``-0.050000000000000044`` shows as ``-0.05``; none shows as ``empty``."""
    live = Mix(engine.identity)
    live.set("happy", vector, -0.050000000000000044)
    steered = CognitiveOrchestrator(engine, steering=live).generate("Hi", max_new_tokens=2)
    assert "live mix at start: happy -0.05 ·" in summary(steered)
    assert "live mix at start: happy -0.05" in result_html(steered)
    plain = CognitiveOrchestrator(engine).generate("Hi", max_new_tokens=2)
    assert "live mix at start: empty ·" in summary(plain)


def test_text_is_escaped(engine):
    ids = engine.tokenizer.encode("<b>bold</b> & <script>")
    records = [StepRecord(i, t, 0.5, {}, ()) for i, t in enumerate(ids)]
    result = GenerationResult(prompt_ids=[1], token_ids=ids, text=engine.tokenizer.decode(ids),
                              steps=records)
    for markup in (result_html(result, engine.tokenizer), result_html(result)):
        body = markup.split('<div class="mj-text">')[1].split("</div>")[0]
        assert "<b>" not in body and "<script>" not in body
        assert "&lt;b&gt;" in body or "&lt;" in body


def test_pretty_is_the_summary_then_the_text(result):
    from IPython.lib.pretty import PrettyPrinter
    import io

    out = io.StringIO()
    printer = PrettyPrinter(out)
    pretty(result, printer, False)
    printer.flush()
    first, rest = out.getvalue().split("\n", 1)
    assert first == f"GenerationResult({summary(result)})"
    assert rest == result.text


def test_trace_tensors_are_detached_cpu(result):
    for layer, h in result.big_hidden.items():
        assert h.shape == (len(result.steps), 576) and h.device.type == "cpu" and not h.requires_grad
    assert result.steered.dtype == torch.bool
