"""Every magic, option and bad input, driven through a real IPython InteractiveShell on the
embedded model (big + the same model as small), a throwaway vector library and, for the
interrupt, a real Jupyter kernel."""
from __future__ import annotations

import html
import json
import logging
import re
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from IPython.core.displaypub import DisplayPublisher
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from max_jupyter.handle import GenerationHandle
from max_jupyter.jupyter.magics import MaxMagics
from max_jupyter.jupyter.sweep import Sweep
from max_jupyter.orchestrator.speculative import MAX_SPECULATE
from max_jupyter.orchestrator.trace import GenerationResult

pytestmark = pytest.mark.slow  # a shell with the embedded model loaded

HAPPY = ["I love this, it is wonderful!", "Great joy and happiness.", "What a lovely sunny day."]
SAD = ["I hate this, it is terrible.", "Awful misery and sadness.", "What a bleak grey day."]


class Recorder(DisplayPublisher):
    """A display publisher that keeps every message (display, update, clear) with its time."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.messages: list[dict] = []

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        self.messages.append({"data": data, "id": (transient or {}).get("display_id"),
                              "update": update, "t": time.monotonic()})

    def clear_output(self, wait=False):
        self.messages.append({"clear": wait, "t": time.monotonic()})

    def take(self) -> list[dict]:
        out, self.messages = self.messages, []
        return out


@pytest.fixture(scope="module")
def shell():
    """The shell with the extension loaded and a session (big + same as small, throwaway
    library) holding a 'happy' vector at layers 10-15."""
    ip = InteractiveShell.instance()
    ip.display_pub = Recorder(shell=ip)
    ip.run_line_magic("load_ext", "max_jupyter")
    ip.run_line_magic("max_load", "--small same --store :memory:")
    ip.user_ns.update(happy_list=HAPPY, sad_list=SAD)
    ip.run_line_magic("max_steer", "train happy --pos $happy_list --neg $sad_list --layers 10-15 "
                                   "--method mean_diff")
    yield ip
    ip.run_line_magic("unload_ext", "max_jupyter")
    ip.user_ns["max_session"].close()


@pytest.fixture
def session(shell):
    s = shell.user_ns["max_session"]
    yield s
    s.mix.clear()
    s.judges.clear()
    s.mixes.clear()


def magics(shell) -> MaxMagics:
    return shell.magics_manager.registry["MaxMagics"]


def run(shell, code: str):
    """Run a cell; re-raise whatever it raised."""
    result = shell.run_cell(code, store_history=False)
    if result.error_in_exec is not None:
        raise result.error_in_exec
    if result.error_before_exec is not None:
        raise result.error_before_exec
    return result.result


def fails(shell, capsys, code: str) -> str:
    """Run a cell that must end in a one-line UsageError; return that line."""
    capsys.readouterr()
    result = shell.run_cell(code, store_history=False)
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("UsageError: "), lines
    return lines[0]


# ---------------------------------------------------------------- extension

def test_import_stays_light():
    code = ("import sys, max_jupyter; "
            "print(sorted(m for m in ('transformers', 'IPython', 'matplotlib', 'max_jupyter.jupyter') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_load_and_unload_are_symmetric(shell, session):
    run(shell, "%%max_generate -n 2\nHi")
    result = session.last
    fmt = shell.display_formatter
    assert "text/html" in fmt.format(result)[0]
    shell.run_line_magic("unload_ext", "max_jupyter")
    assert "max_generate" not in shell.magics_manager.magics["cell"]
    assert "max_steer" not in shell.magics_manager.magics["line"]
    assert not [c for c in shell.configurables if isinstance(c, MaxMagics)]
    assert "text/html" not in fmt.format(result)[0]
    shell.run_line_magic("load_ext", "max_jupyter")
    assert len([c for c in shell.configurables if isinstance(c, MaxMagics)]) == 1
    assert magics(shell).session is session  # re-attached from max_session
    html = fmt.format(result)[0]["text/html"]
    assert len(re.findall(r'<span class="mj-tok[^"]*" style=', html)) == len(result.token_ids)
    assert fmt.format(result)[0]["text/plain"].startswith("GenerationResult(")


def test_help_lists_every_option(shell):
    for kind, name in [("line", "max_load"), ("cell", "max_generate"), ("line", "max_steer"),
                       ("line", "max_judge"), ("line", "max_sweep"), ("line", "max_serve")]:
        fn = shell.find_magic(name, kind)
        for action in fn.parser._actions:
            for option in action.option_strings:
                assert option in fn.__doc__, (name, option)


def test_max_load_prints_the_models_and_binds_the_session(shell, capsys):
    saved = shell.user_ns["max_session"]
    shell.user_ns["saved_session"] = saved
    capsys.readouterr()
    run(shell, "%max_load --session saved_session")
    out = capsys.readouterr().out
    assert out.startswith("big:   LlamaForCausalLM (30 layers")
    assert "small: LlamaForCausalLM" in out
    assert shell.user_ns["max_session"] is saved


# ---------------------------------------------------------------- %%max_generate

def test_generate_streams_then_returns_the_result(shell, session):
    shell.display_pub.take()
    result = run(shell, "%%max_generate -n 12 -v out\nTell me a story about a cat.")
    messages = shell.display_pub.take()
    assert isinstance(result, GenerationResult) and shell.user_ns["out"] is result
    assert len(result.steps) == 12 and session.last is result
    first, updates = messages[:2], [m for m in messages if m.get("update")]
    assert all(m["id"] and not m["update"] for m in first)
    text_updates = [m for m in updates if m["id"] == first[0]["id"]]
    status = [m for m in updates if m["id"] == first[1]["id"]]
    assert len(text_updates) >= 2 and len(status) >= 2
    assert "step " in status[-1]["data"]["text/html"] and "tok/s" in status[-1]["data"]["text/html"]
    streamed = re.findall(r'<span class="mj-tok[^"]*">([^<]*)</span>', text_updates[-1]["data"]["text/html"])
    assert 0 < len(streamed) <= len(result.token_ids)
    assert result.text.startswith(html.unescape("".join(streamed)))
    assert messages[-1] == {"clear": True, "t": messages[-1]["t"]}


def test_stream_updates_at_most_update_hz(shell, session):
    """Several updates while it runs, never two of one output closer than 1 / update_hz
    (1 Hz here, so that tokens come faster than updates even on a busy machine)."""
    try:
        magics(shell).update_hz = 1.0
        shell.display_pub.take()
        run(shell, "%%max_generate -n 60 --judge none\nCount from one to fifty in words.")
        messages = shell.display_pub.take()
    finally:
        magics(shell).update_hz = 20.0
    text_id = messages[0]["id"]
    times = [m["t"] for m in messages if m.get("update") and m["id"] == text_id]
    assert len(times) >= 3, times
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 1.0 - 0.01, gaps  # 10 ms: the publish itself


def test_stream_sends_at_most_20_updates_per_second_and_only_changes(shell):
    """1000 events in one (simulated) second: at most 20 flushes; a flush sends an output
    only if it changed (a step that added no text leaves the text output alone)."""
    from max_jupyter.jupyter.stream import StreamDisplay
    from max_jupyter.orchestrator.trace import StepEvent, StepRecord

    now = [0.0]
    shell.display_pub.take()
    view = StreamDisplay(20.0, clock=lambda: now[0])
    for i in range(1000):
        now[0] = i / 1000
        view.add(StepEvent(StepRecord(i, 1, 1.0, {}, ()), "x" if i < 500 else ""))
    messages = shell.display_pub.take()
    text_id, status_id = messages[0]["id"], messages[1]["id"]
    text = [m for m in messages if m.get("update") and m["id"] == text_id]
    status = [m for m in messages if m.get("update") and m["id"] == status_id]
    assert len(status) == 20
    assert len(text) == 11  # the flushes at 0.00 .. 0.50 s carry new text; later ones none


def test_no_stream_shows_nothing_until_the_result(shell, session):
    shell.display_pub.take()
    result = run(shell, "%%max_generate -n 3 --no-stream\nHi")
    assert len(result.steps) == 3
    assert shell.display_pub.take() == []


def test_sampling_options(shell, session):
    cell = "%%max_generate -n 8 --temperature 0.9 --top-k 20 --top-p 0.9 --seed {}\nName a colour."
    a, b, c = (run(shell, cell.format(s)) for s in (7, 7, 8))
    assert a.token_ids == b.token_ids
    greedy = run(shell, "%%max_generate -n 8\nName a colour.")
    assert greedy.token_ids == run(shell, "%%max_generate -n 8\nName a colour.").token_ids
    assert {tuple(a.token_ids), tuple(c.token_ids), tuple(greedy.token_ids)} != {tuple(a.token_ids)}


def test_prompt_options(shell, session):
    tok = session.big.tokenizer
    chat = run(shell, "%%max_generate -n 1\nHello there")
    raw = run(shell, "%%max_generate -n 1 --raw\nHello there")
    system = run(shell, "%%max_generate -n 1 --system \"You are a pirate.\"\nHello there")
    assert tok.decode(raw.prompt_ids).endswith("Hello there") and "<|im_start|>" not in tok.decode(raw.prompt_ids)
    assert "<|im_start|>user\nHello there" in tok.decode(chat.prompt_ids)
    assert "You are a pirate." in tok.decode(system.prompt_ids)
    shell.user_ns["who"] = "a cat"
    expanded = run(shell, "%%max_generate -n 1 --system \"You are {who}.\"\nHi $who")
    text = tok.decode(expanded.prompt_ids)
    assert "You are a cat." in text and "Hi $who" in text  # the line is expanded, the cell is verbatim


def test_capture_and_steer_options(shell, session):
    happy = session.vectors["happy"]
    r = run(shell, '%%max_generate -n 4 --capture 3,5 --capture-small 2 --steer "0.5*happy@12 - happy:0.25@14"\nHi')
    assert set(r.big_hidden) == {3, 5} and r.big_hidden[3].shape == (4, 576)
    assert set(r.small_hidden) == {2}
    assert set(r.deltas) == {12, 14}
    norms = session.big.residual_norms  # coefficients on the scale of docs/vectors.md
    torch.testing.assert_close(r.deltas[12][1], happy.select([12]).deltas(0.5, norms)[12])
    torch.testing.assert_close(r.deltas[14][1], happy.select([14]).deltas(-0.25, norms)[14])
    run(shell, "%max_steer on happy 0.5 --layers 11")
    live = run(shell, "%%max_generate -n 2\nHi")
    assert set(live.deltas) == {11} and live.steps[1].live_coefs == {"happy": 0.5}


def test_capture_prompt_logits_topk_and_token_strings(shell, session):
    r = run(shell, "%%max_generate -n 3 --capture 3,5 --capture-prompt --logits --topk 4\nHi")
    n_prompt = len(r.prompt_ids)
    assert set(r.prompt_hidden) == {3, 5} and r.prompt_hidden[5].shape == (n_prompt, 576)
    assert r.big_hidden[5].shape == (3, 576), "the prompt's states are kept apart from the steps'"
    torch.testing.assert_close(r.prompt_hidden[5][-1], r.big_hidden[5][0])
    assert r.big_logits.shape == (3, session.big.identity.vocab_size)
    assert r.big_topk.ids.shape == (3, 4)
    assert torch.equal(r.big_topk.ids, torch.topk(r.big_logits, 4).indices)
    assert len(r.str_tokens) == len(r.token_ids) and "".join(r.str_tokens) == r.text
    assert len(r.prompt_str_tokens) == n_prompt
    assert "".join(r.prompt_str_tokens) == session.big.tokenizer.decode(r.prompt_ids)
    plain = run(shell, "%%max_generate -n 2\nHi")
    assert plain.prompt_hidden == {} and plain.big_logits is None


def test_an_uncaptured_layer_says_what_was_captured_and_how_to_capture_it(shell, session):
    """In the magic's spelling for a magic's result, in Python's for a Python call's."""
    r = run(shell, "%%max_generate -n 2 --capture 3,5 --capture-prompt\nHi")
    with pytest.raises(KeyError) as e:
        r.big_hidden[14]
    assert str(e.value) == ("big_hidden[14]: layer 14 was not captured (captured: 3, 5); "
                            "capture it with --capture 3,5,14.")
    with pytest.raises(KeyError, match="capture it with --capture 3,5,14 --capture-prompt"):
        r.prompt_hidden[14]
    with pytest.raises(KeyError, match=r"\(captured: none\); capture it with --capture-small 1\."):
        r.small_hidden[1]
    py = session.generate("Hi", max_new_tokens=2)
    with pytest.raises(KeyError, match=r"\(captured: none\); capture it with "
                                       r"TraceConfig\(big_layers=\(14,\)\)\."):
        py.big_hidden[14]


def test_background_returns_a_handle(shell, session):
    handle = run(shell, "%%max_generate -n 5 --background -v h\nHi")
    assert isinstance(handle, GenerationHandle) and shell.user_ns["h"] is handle
    assert len(handle.result(timeout=120).steps) == 5 and handle.state == "done"


def test_config_defaults_and_bad_values(shell, session, caplog):
    run(shell, "%config MaxMagics.max_new_tokens = 3")
    assert len(run(shell, "%%max_generate\nHi").steps) == 3
    run(shell, "%config MaxMagics.capture = '4-5'")
    assert set(run(shell, "%%max_generate -n 1\nHi").big_hidden) == {4, 5}
    for bad in ["max_new_tokens = 0", "top_p = 1.5", "update_hz = 50", "capture = 'x-'",
                "temperature = -1", "speculate = -1", f"speculate = {MAX_SPECULATE + 1}",
                "speculate = True", "speculate = 2.5", "speculate = None"]:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            run(shell, f"%config MaxMagics.{bad}")
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0], (bad, errors)
    m = magics(shell)
    assert ((m.max_new_tokens, m.top_p, m.update_hz, m.capture, m.temperature, m.speculate)
            == (3, None, 20.0, "4-5", None, 0))
    caplog.clear()
    with caplog.at_level(logging.ERROR):  # a refused value stays in the shell's config ...
        shell.run_line_magic("reload_ext", "max_jupyter")
    assert magics(shell).max_new_tokens is None  # ... and is skipped with one error line
    assert len([r for r in caplog.records if "ignored MaxMagics" in r.getMessage()]) >= 1
    run(shell, "%config MaxMagics.max_new_tokens = None")
    run(shell, "%config MaxMagics.capture = ''")
    run(shell, "%config MaxMagics.update_hz = 20.0")
    run(shell, "%config MaxMagics.top_p = None")
    run(shell, "%config MaxMagics.temperature = None")
    run(shell, "%config MaxMagics.speculate = 0")


def test_speculate_gives_the_same_text_and_shows_the_drafts(shell, session, unpaced):
    """The session's small model is the big one again: speculation drafts, the text stays
    the greedy text, and the result's summary (HTML and plain) shows the counts. Drafting by
    acceptance alone: pacing may pause speculation that does not pay on this machine, and
    the session keeps that pause for the next generation."""
    prompt = "\nDescribe a quiet morning by the sea."
    plain = run(shell, "%%max_generate -n 24 --no-stream" + prompt)
    fast = run(shell, "%%max_generate -n 24 --speculate 4" + prompt)  # streamed
    assert fast.text == plain.text and fast.token_ids == plain.token_ids
    assert fast.drafted_tokens > 0 and fast.speculate_off is None
    shown = (f"speculation: drafted {fast.drafted_tokens}, accepted {fast.accepted_tokens} "
             f"({fast.acceptance_rate:.0%} acceptance)")
    formats = shell.display_formatter.format(fast)[0]
    assert shown in html.unescape(formats["text/html"]) and shown in formats["text/plain"]
    assert "speculation" not in shell.display_formatter.format(plain)[0]["text/plain"]
    try:
        run(shell, "%config MaxMagics.speculate = 3")
        by_trait = run(shell, "%%max_generate -n 24 --no-stream" + prompt)
        off = run(shell, "%%max_generate -n 24 --no-stream --speculate 0" + prompt)
    finally:
        run(shell, "%config MaxMagics.speculate = 0")
    assert by_trait.token_ids == off.token_ids == plain.token_ids
    assert by_trait.drafted_tokens > 0 and off.drafted_tokens == 0
    assert max(len(r.drafted) for r in by_trait.steps) <= 3 < max(len(r.drafted) for r in fast.steps)


def test_speculate_off_is_shown_without_a_small_model(shell, capsys):
    """Asked for on a session with no small model: the text as without, and why it was off."""
    from max_jupyter.session import Session

    alone, saved = Session.load(store=None, progress=False), magics(shell).session
    magics(shell).session = alone
    try:
        asked = run(shell, "%%max_generate -n 6 --no-stream --speculate 4\nHi")
        plain = run(shell, "%%max_generate -n 6 --no-stream\nHi")
        shown = shell.display_formatter.format(asked)[0]
    finally:
        magics(shell).session = saved
        alone.close()
    assert asked.token_ids == plain.token_ids and asked.drafted_tokens == 0
    assert "small model" in asked.speculate_off and plain.speculate_off is None
    assert f"speculation off: {asked.speculate_off}" in html.unescape(shown["text/html"])
    assert f"speculation off: {asked.speculate_off}" in shown["text/plain"]


# ---------------------------------------------------------------- %max_steer

def test_steer_train_list_show(shell, session, tmp_path, capsys):
    (tmp_path / "pos.txt").write_text("\n".join(HAPPY) + "\n")
    (tmp_path / "neg.txt").write_text("\n".join(SAD) + "\n\n")
    shell.user_ns["folder"] = str(tmp_path)
    run(shell, "%max_steer train joy --pos {folder}/pos.txt --neg {folder}/neg.txt --layers 12")
    assert session.vectors["joy"].layers == (12,)
    torch.testing.assert_close(session.vectors["joy"].directions[12].norm(),
                               session.vectors["happy"].directions[12].norm(), rtol=0.5, atol=0)
    run(shell, "%max_steer train joy_reply --pos {folder}/pos.txt --neg {folder}/neg.txt --layers 12 --read reply")
    last, reply = session.vectors["joy"].directions[12], session.vectors.pop("joy_reply").directions[12]
    torch.testing.assert_close(reply.norm(), last.norm())  # the same length, another direction
    assert float(torch.cosine_similarity(reply, last, 0)) < 0.99
    capsys.readouterr()
    run(shell, "%max_steer list")
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[0] for l in lines] == ["happy", "joy"]
    run(shell, "%max_steer show joy")
    out = capsys.readouterr().out
    assert out.startswith("joy: for LlamaForCausalLM") and "norms: 12: " in out and "3 pairs" in out


def test_steer_on_off_mix_save_load_rm(shell, session, capsys):
    run(shell, "%max_steer on happy 0.8 --layers 12-13")
    run(shell, "%max_steer on joy -0.5")
    entries = session.mix.entries
    assert entries["happy"].coef == 0.8 and entries["happy"].layers == (12, 13)
    assert entries["joy"].coef == -0.5
    capsys.readouterr()
    run(shell, "%max_steer mix")
    assert capsys.readouterr().out.strip() == "live mix: happy +0.8 @12,13; joy -0.5"
    run(shell, "%max_steer save combo")  # a saved mix is its expression
    assert session.vectors.load_mix("combo")[0] == "0.8*happy@12,13 - 0.5*joy"
    run(shell, "%max_steer off joy")
    assert list(session.mix.entries) == ["happy"]
    run(shell, "%max_steer off")
    assert len(session.mix) == 0
    run(shell, "%max_steer load combo")
    entries = session.mix.entries
    assert [(n, e.coef, e.layers) for n, e in entries.items()] == [("happy", 0.8, (12, 13)), ("joy", -0.5, None)]
    session.vectors["combo_vector"] = session.vectors["happy"]
    run(shell, "%max_steer load combo_vector")  # a vector, not a saved mix: it alone at 1
    assert list(session.mix.entries) == ["combo_vector"] and session.mix.entries["combo_vector"].coef == 1.0
    run(shell, "%max_steer rm combo_vector")
    assert "combo_vector" not in session.vectors


def test_steer_export_import_gguf(shell, session, tmp_path):
    shell.user_ns["path"] = str(tmp_path / "happy.gguf")
    run(shell, "%max_steer export happy $path")
    run(shell, "%max_steer import $path --as happy_again")
    a, b = session.vectors["happy"], session.vectors["happy_again"]
    assert a.layers == b.layers
    for layer in a.layers:
        torch.testing.assert_close(a.directions[layer], b.directions[layer])
    run(shell, "%max_steer rm happy_again")


def test_steer_search(shell, session, capsys):
    capsys.readouterr()
    run(shell, "%max_steer search happy --layer 12 -k 2")
    hits = capsys.readouterr().out.splitlines()
    assert hits[0].split()[0] == "happy" and hits[0].endswith("cosine +1.000")
    run(shell, "%%max_generate -n 3 --capture 12\nHi")
    capsys.readouterr()
    run(shell, "%max_steer search --active --layer 12 -k 1")
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3 and all(r.split()[0] == str(i) for i, r in enumerate(rows))


# ---------------------------------------------------------------- %max_judge

def test_judges(shell, session, capsys):
    run(shell, "%max_judge probe happy --layer 12 --threshold -1000 --steer happy:0.3@12")
    run(shell, "%max_judge divergence --threshold 0.0 --measure kl --steer happy:0.2 --name unsure")
    assert set(session.judges) == {"probe:happy@12", "unsure"}
    assert set(session.mixes) == {"probe:happy", "unsure"}
    capsys.readouterr()
    run(shell, "%max_judge list")
    out = capsys.readouterr().out
    assert "probe:happy@12: ProbeJudge, pre-step, threshold -1000" in out
    assert "unsure: DivergenceJudge, post-step, threshold 0" in out
    r = run(shell, "%%max_generate -n 3\nHi")
    assert set(r.scores) == {"probe:happy@12", "unsure"}
    assert all("probe:happy" in s.mixes_on for s in r.steps)
    only = run(shell, "%%max_generate -n 2 --judge unsure\nHi")
    assert set(only.scores) == {"unsure"}
    none = run(shell, "%%max_generate -n 2 --judge none\nHi")
    assert none.scores == {}
    run(shell, "%max_judge off unsure")
    assert set(session.judges) == {"probe:happy@12"}
    assert set(session.mixes) == {"probe:happy"}  # off removes the mix its --steer added
    capsys.readouterr()
    run(shell, "%max_judge off")
    assert session.judges == {} and session.mixes == {}
    assert "removed mix 'probe:happy'" in capsys.readouterr().out


# ---------------------------------------------------------------- %max_sweep

def test_sweep_line_and_cell(shell, session):
    sweep = run(shell, '%max_sweep happy@12-15 --coefs 0:4:4 -n 6 -v sw --prompt "Describe the sea."')
    assert isinstance(sweep, Sweep) and shell.user_ns["sw"] is sweep
    assert sweep.coefs == [0.0, 4.0] and sweep.spec == "happy@12,13,14,15"
    plain = run(shell, "%%max_generate -n 6 --judge none\nDescribe the sea.")
    assert sweep.rows[0].result.token_ids == plain.token_ids
    ppl = sweep.perplexities
    assert torch.isfinite(ppl).all() and ppl[1] > ppl[0] > 1.0
    assert set(sweep.rows[1].result.deltas) == {12, 13, 14, 15}
    html = sweep._repr_html_()
    assert html.count("<tr>") == 3 and f"{float(ppl[0]):.2f}" in html
    fig = sweep.plot()
    xs, ys = fig.axes[0].get_lines()[0].get_data()
    assert list(xs) == [0.0, 4.0] and list(ys) == pytest.approx(ppl.tolist())
    cell = run(shell, "%%max_sweep happy --coefs -1,1 -n 2\nDescribe the sea.")
    assert cell.coefs == [-1.0, 1.0] and cell.prompt == "Describe the sea."


# ---------------------------------------------------------------- %max_serve

def test_serve_start_and_stop(shell, session, capsys):
    url = run(shell, "%max_serve --port 0 --api-key secret")
    assert magics(shell).server.running
    request = urllib.request.Request(url + "/v1/models", headers={"Authorization": "Bearer secret"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200 and json.load(reply)["data"]
    run(shell, "%max_serve stop")
    assert not magics(shell).server.running
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/v1/models", timeout=5)


# ---------------------------------------------------------------- bad input

BAD = [
    ("%%max_generate --bogus\nHi", "unrecognized arguments: --bogus"),
    ("%%max_generate -n many\nHi", "argument -n: invalid int value: 'many'"),
    ("%%max_generate --steer nope:1\nHi", "unknown vector 'nope'"),
    ("%%max_generate --temprature 0\nHi", "--temprature 0 (did you mean '--temperature'?)"),
    ("%%max_generate --steer hapy:1\nHi", "unknown vector 'hapy' (did you mean 'happy'?)"),
    ("%max_steer lst", "unknown %max_steer command 'lst' (did you mean 'list'?)"),
    ("%%max_generate --steer '0.5*'\nHi", "expected a vector name"),
    ("%%max_generate --steer 'happy@40'\nHi", "layer(s) [40] out of range"),
    ("%%max_generate --steer 'happy@3'\nHi", "has no layer(s) [3]"),
    ("%%max_generate --capture 30\nHi", "layer(s) [30] out of range"),
    ("%%max_generate --judge nobody\nHi", "no judge named 'nobody'"),
    ("%%max_generate --capture-prompt\nHi", "give them too, e.g. --capture 14 --capture-prompt"),
    ("%%max_generate --topk 0\nHi", "--topk 0: keep at least 1 logit per step"),
    ("%%max_generate -n 0\nHi", "max_new_tokens"),
    ("%%max_generate --speculate -1\nHi", "speculate=-1 is out of range"),
    (f"%%max_generate --speculate {MAX_SPECULATE + 1}\nHi", f"speculate={MAX_SPECULATE + 1} is out of range"),
    ("%%max_generate --speculate two\nHi", "argument --speculate: invalid int value: 'two'"),
    ("%%max_generate --speculate 2.5\nHi", "argument --speculate: invalid int value: '2.5'"),
    ("%%max_generate\n", "the cell body is empty"),
    ("%%max_generate\n   \n", "the cell is empty"),
    ("%max_steer frobnicate", "unknown %max_steer command 'frobnicate'"),
    ("%max_steer on happy", "%max_steer on takes NAME COEF"),
    ("%max_steer on happy lots", "COEF 'lots' is not a number"),
    ("%max_steer on happy 1 --layers 40", "layer(s) [40] out of range"),
    ("%max_steer on nope 1", "unknown vector 'nope'"),
    ("%max_steer off nope", "'nope' is not in the live mix"),
    ("%max_steer train x --pos $nothing --neg $sad_list", "no variable 'nothing'"),
    ("%max_steer train x --pos missing.txt --neg $sad_list", "neither $variable"),
    ("%max_steer train x --pos $happy_list --neg $sad_list --read middle",
     "read='middle' is unknown; use one of ['last_token', 'reply']"),
    ("%max_steer show nope", "unknown vector 'nope'"),
    ("%max_steer save empty", "the live mix is empty"),
    ("%max_judge probe happy --threshold 1 --steer happy:1", "pass layer= to choose one"),
    ("%max_judge probe happy --layer 12", "--threshold is required"),
    ("%max_judge divergence --threshold 1", "which does not exist; give --steer"),
    ("%max_judge off nobody", "no judge 'nobody'"),
    ("%max_sweep happy --coefs 2:1:1 --prompt Hi", "--coefs '2:1:1'"),
    ("%max_sweep happy:2 --coefs 0:1:1 --prompt Hi", "without a coefficient"),
    ("%max_sweep happy --coefs 0:1:1", "needs a prompt"),
]


@pytest.mark.parametrize("code,message", BAD, ids=[c.split("\n")[0] for c, _ in BAD])
def test_bad_input_is_one_line(shell, session, capsys, code, message):
    line = fails(shell, capsys, code)
    assert message in line, line


def test_session_unharmed_by_bad_input(shell, session):
    assert len(run(shell, "%%max_generate -n 2\nHi").steps) == 2
    assert not session.busy


def test_generate_before_load(shell, capsys):
    saved = shell.user_ns.pop("max_session")
    shell.run_line_magic("unload_ext", "max_jupyter")
    shell.run_line_magic("load_ext", "max_jupyter")
    try:
        assert "run %max_load first" in fails(shell, capsys, "%%max_generate\nHi")
        assert "run %max_load first" in fails(shell, capsys, "%max_steer list")
    finally:
        shell.user_ns["saved"] = saved
        run(shell, "%max_load --session saved")


def test_real_bug_keeps_its_traceback(shell, session, capsys):
    magics(shell).session = object()  # not a Session: a bug, not bad input
    try:
        capsys.readouterr()
        result = shell.run_cell("%max_steer mix", store_history=False)
        assert isinstance(result.error_in_exec, AttributeError)
        captured = capsys.readouterr()
        shown = captured.out + captured.err
        assert "AttributeError" in shown and not shown.startswith("UsageError")
        assert len(shown.strip().splitlines()) > 3  # a traceback, not one line
    finally:
        magics(shell).session = session


# ---------------------------------------------------------------- --steer specs

@pytest.mark.parametrize("spec,terms", [
    ("joy:0.8", ["0.8*joy"]),
    ("0.5*joy - 0.3*formal@12-16", ["0.5*joy", "-0.3*formal@12,13,14,15,16"]),
    ("-joy + joy*2@3,5-6", ["-1*joy", "2*joy@3,5,6"]),
    ("0.5*happy@12 - happy:-0.25@14", ["0.5*happy@12", "0.25*happy@14"]),
    ("a.b/c:1e-1", ["0.1*a.b/c"]),
])
def test_spec_parser(spec, terms):
    from max_jupyter.jupyter.steerspec import parse_spec

    assert [str(t) for t in parse_spec(spec)] == terms


@pytest.mark.parametrize("spec,error", [
    ("", "empty expression at column 1"), ("joy:", "expected a coefficient after ':'"),
    ("joy joy", "after a term, found 'joy' at column 5"), ("joy@16-12", "runs backwards"),
    ("0.5*joy:2", "given twice"), ("joy@1.5", "not a whole number"), ("j!oy", "found '!' at column 2"),
    ("j#oy", "unexpected '#' at column 2"),
])
def test_spec_parser_errors_are_one_line(spec, error):
    from max_jupyter.errors import BadArgumentError
    from max_jupyter.jupyter.steerspec import parse_spec

    with pytest.raises(BadArgumentError) as e:
        parse_spec(spec)
    assert error in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- a real kernel

def _until_idle(kc, msg_id: str, timeout: float = 300) -> list[dict]:
    """The iopub messages of request ``msg_id`` until the kernel is idle again."""
    messages = []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return messages


def _execute(kc, code: str) -> list[dict]:
    messages = _until_idle(kc, kc.execute(code))
    errors = [m["content"] for m in messages if m["msg_type"] == "error"]
    assert not errors, errors
    return messages


def _result_text(messages: list[dict]) -> str:
    (result,) = [m["content"]["data"] for m in messages if m["msg_type"] == "execute_result"]
    assert 'class="mj-tok' in result["text/html"]
    return result["text/plain"]


def test_interrupt_in_a_real_kernel():
    """Ctrl-C during a blocking %%max_generate: the partial result is the cell's output
    (after several live updates), and the session generates again afterwards."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        _execute(kc, "%load_ext max_jupyter\n%max_load --store :memory:")
        msg_id = kc.execute("%%max_generate -n 3000\nWrite a very long story about a lighthouse keeper.")
        updates = []
        while len(updates) < 6:
            msg = kc.get_iopub_msg(timeout=300)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "update_display_data":
                updates.append(msg)
        km.interrupt_kernel()
        messages = _until_idle(kc, msg_id)
        assert not [m for m in messages if m["msg_type"] == "error"]
        text = _result_text(messages)
        summary, partial = text.split("\n", 1)
        steps = int(re.match(r"GenerationResult\((\d+) tokens", summary).group(1))
        assert "finish: interrupted" in summary and 0 < steps < 3000 and partial.strip()
        again = _result_text(_execute(kc, "%%max_generate -n 3\nHi"))
        assert again.startswith("GenerationResult(3 tokens") and "finish: length" in again
        busy = _execute(kc, "print(max_session.busy, max_session.handle.state)")
        assert [m["content"]["text"] for m in busy if m["msg_type"] == "stream"] == ["False done\n"]
        reload = _execute(kc, "old = max_session\n%max_load --store none\n"
                              "print(old.closed, max_session.closed, type(max_session.vectors).__name__)")
        printed = "".join(m["content"]["text"] for m in reload
                          if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")
        assert printed.endswith("True False dict\n")  # %max_load closed the session it replaced
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_refused_judge_leaves_no_mix_behind(shell, session, capsys):
    """A %max_judge refused after its --steer mix was made takes that mix away again."""
    fails(shell, capsys, "%max_judge probe happy --threshold 1 --steer happy:0.5 --layer 3")
    assert session.mixes == {} and session.judges == {}


# ---------------------------------------------------------------- one expression, every path

EXPRESSION = "0.8 happy @response; !happy@12 @first:6; 0.5 happy @when:happy>0.5"


def test_one_expression_gives_the_same_tokens_through_python_the_magic_the_mixer_and_http(shell, session):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from max_jupyter.jupyter.mixer import Mixer
    from max_jupyter.server import BackgroundServer
    from max_jupyter.server.background import DEFAULT_MODEL_NAME

    prompt = "Tell me about your morning."
    messages = [{"role": "user", "content": prompt}]
    python = session.generate(messages, max_new_tokens=10, temperature=0, steering=EXPRESSION)
    steps = python.steps
    assert all(step.interventions[12].startswith("ablate1") for step in steps[:6])  # @first:6
    assert all("ablate" not in label for step in steps[6:] for label in step.interventions.values())
    assert 10 not in steps[0].interventions or steps[0].mixes_on  # @response: the prompt only by the gate
    assert all(step.interventions[10] == "add" for step in steps[1:])
    run(shell, f'%%max_generate -n 10 --temperature 0 --steer "{EXPRESSION}"\n{prompt}')
    assert session.last.token_ids == python.token_ids
    mixer = Mixer(session)
    try:
        mixer.expression.value = EXPRESSION
        assert mixer.expression_error.value == ""
        assert session.expression() == "0.8*happy @response; !happy@12 @first:6; 0.5*happy @when:happy>0.5"
        mixed = session.generate(messages, max_new_tokens=10, temperature=0)
        mixer.expression.value = "0.8 happy + sad"
        assert "unknown vector &#x27;sad&#x27;" in mixer.expression_error.value
        assert "at column 13" in mixer.expression_error.value
        mixer.expression.value = ""
        assert len(session.mix) == 0 and not session.judges
    finally:
        mixer.close()
    assert mixed.token_ids == python.token_ids
    server = BackgroundServer(session, port=0, api_key="k")
    server.start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=10,
                                               temperature=0, extra_body={"steering": EXPRESSION})
        assert session.last.token_ids == python.token_ids
        assert reply.choices[0].message.content == python.text
        with pytest.raises(openai.BadRequestError, match="column 13"):
            client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=4,
                                           extra_body={"steering": "0.8 happy + sad"})
    finally:
        server.stop()


def test_max_steer_set_save_and_load_keep_a_mix_as_its_expression(shell, session, capsys):
    run(shell, "%max_steer set 0.5 happy @response; !happy@12")
    assert session.expression() == "0.5*happy @response; !happy@12"
    run(shell, "%max_steer save calm_reply")
    assert session.vectors.load_mix("calm_reply")[0] == "0.5*happy @response; !happy@12"
    run(shell, "%max_steer off")
    run(shell, "%max_steer load calm_reply")
    assert session.expression() == "0.5*happy @response; !happy@12"
    assert "at column 9" in fails(shell, capsys, "%max_steer set happy + sad")


# Last in the file: it replaces the module's session.
def test_max_load_dtype_loads_an_int8_small_model_and_refuses_a_bad_one_first(shell, capsys):
    saved = shell.user_ns["max_session"]
    line = fails(shell, capsys, "%max_load --small same --dtype float32,int9")
    assert "dtype[1]='int9' is not a supported weight dtype" in line
    assert shell.user_ns["max_session"] is saved and not saved.closed  # checked before closing it
    run(shell, "%max_load --small same --dtype ,int8 --store :memory:")  # the big model at its default
    loaded = shell.user_ns["max_session"]
    assert saved.closed and loaded is not saved
    from max_jupyter.engines.cpu_linear import Int8Linear, PackedLinear
    assert any(isinstance(m, PackedLinear) for m in loaded.big.model.modules())
    assert any(isinstance(m, Int8Linear) for m in loaded.small.model.modules())
    assert len(run(shell, "%%max_generate -n 3\nHi").steps) == 3
