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

pytestmark = pytest.mark.slow  # a generation of the embedded model


@pytest.fixture(scope="module")
def result(engine, small, vector) -> GenerationResult:
    """12 steps with a pre-step probe judge on the small model (same weights, so the big
    model's vector fits it) turning "happy" on from step 0, and a post-step entropy judge
    that turns another mix ("firm") on where the big model is unsure, re-running those
    steps (a judge re-runs a step only for a mix its first pass did not have)."""
    happy = Mix(engine.identity)
    happy.set("happy", vector, 2.0)
    firm = Mix(engine.identity)
    firm.set("happy", vector, 4.0, layers=[15])
    probe = ProbeJudge(vector, layer=10, threshold=-1e9, hysteresis=0.0, mix="happy")  # from step 0
    orch = CognitiveOrchestrator(engine, small, mixes={"happy": happy, "firm": firm},
                                 judges=[probe, DivergenceJudge(threshold=3.5, mix="firm")])
    out = orch.generate("Tell me about rain.", max_new_tokens=12, ignore_eos=True,
                        trace=TraceConfig(big_layers=(10, 15)))
    return out  # (entropy of the first passes: 4.1 5.0 4.5 4.4 3.9 3.6 3.4 2.8 ...: 6 re-runs)


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
    reruns = [r.rerun for r in result.steps]
    assert any(reruns) and not all(reruns)  # the fixture re-runs some steps, not all
    assert [("mj-rerun" in cls) for cls, _, _ in found] == reruns
    assert [("mj-changed" in cls) for cls, _, _ in found] == [r.changed for r in result.steps]


def test_tooltips_hold_scores_and_both_models_top_k(result, engine, small):
    found = spans(result_html(result, engine.tokenizer, small.tokenizer))
    assert any(record.rerun for record in result.steps)  # so the re-run tooltip is checked
    for (_, title, _), record in zip(found, result.steps):
        title = html.unescape(title)
        assert f"step {record.step} " in title
        for name, score in record.scores.items():
            assert f"{name}={score:.3g}" in title
        best_big = engine.tokenizer.token_text(int(result.big_topk.ids[record.step, 0]))
        best_small = small.tokenizer.token_text(int(result.small_topk.ids[record.step, 0]))
        assert f"big top-k (logit): {best_big!r}" in title
        assert f"small top-k (logit): {best_small!r}" in title
        if record.rerun:
            assert "re-run: first pass chose" in title
        assert "\ufffd" not in title, "a partial character shown as U+FFFD"


def test_a_token_holding_part_of_a_character_shows_its_bytes(engine, vector):
    """Steered by "happy" at 2.0 this model starts with an emoji split over tokens: the
    first token's piece is empty (the next carries the character) and its tooltip shows
    its bytes."""
    happy = Mix(engine.identity)
    happy.set("happy", vector, 2.0)
    result = CognitiveOrchestrator(engine, steering=happy).generate(
        "Tell me about rain.", max_new_tokens=6, ignore_eos=True)
    found = spans(result_html(result, engine.tokenizer))
    partial = [html.unescape(title) for _, title, text in found if text == ""]
    assert partial, f"no token ends inside a character in {result.text!r}"
    assert all(re.search(r"'' \(part of a character: .*<0x[0-9A-F]{2}>\)", t) for t in partial)


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
    assert result.reruns.any()
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


def test_a_newline_token_is_marked_not_a_gap(engine):
    """A token that is only line breaks gets ``mj-nl`` (a faint ↵ to hover); the text's
    line height is tighter than the summary's (docs/jupyter.md: newlines)."""
    r = CognitiveOrchestrator(engine).generate("A list of fruits:\n\n1. apple\n2.", chat=False,
                                               max_new_tokens=8)
    marked = [(cls, html.unescape(text)) for cls, _, text in spans(result_html(r, engine.tokenizer))]
    breaks = [text for _, text in marked if "\n" in text and not text.strip()]
    assert breaks, f"no newline token in {r.text!r}"
    assert all(("mj-nl" in cls) == (text in breaks) for cls, text in marked)
    assert ".mj-text{white-space:pre-wrap" in result_html(r) and "line-height:1.45}" in result_html(r)


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
    import io

    from IPython.lib.pretty import PrettyPrinter

    out = io.StringIO()
    printer = PrettyPrinter(out)
    pretty(result, printer, False)
    printer.flush()
    first, rest = out.getvalue().split("\n", 1)
    assert first == f"GenerationResult({summary(result)})"
    assert rest == result.text


def test_trace_tensors_are_detached_cpu(result):
    for _layer, h in result.big_hidden.items():
        assert h.shape == (len(result.steps), 576) and h.device.type == "cpu" and not h.requires_grad
    assert result.steered.dtype == torch.bool
