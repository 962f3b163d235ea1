"""The live Mixer and the TokenView in a real kernel, driven by ``jupyter_client`` (no
browser): a slider update sent as the page sends it (a ``comm_msg`` on the shell channel)
while a background generation runs changes the coefficient of the following steps only;
the mix changed in code moves the slider; the TokenView's batched deltas rebuild every
step. Run on both ipykernel major versions (the other one is pip-installed for the test)."""
from __future__ import annotations

import fnmatch
import html
import json
import re
import time
from pathlib import Path

import pytest
import tomllib

from jupyter_kernels import IPYKERNEL_MAJORS, Kernel, ipykernel_env

pytestmark = pytest.mark.slow  # kernels with the embedded model loaded

OLD, NEW, STEPS = 0.0, 0.8, 60
WIDGET = "application/vnd.jupyter.widget-view+json"

SETUP = f"""
import json, time
import ipykernel
from max_jupyter import Session
from max_jupyter.jupyter import Mixer, TokenView
s = Session.load(store=None, progress=False)
s.train("happy", ["I love this, it is wonderful!", "Great joy and happiness."],
        ["I hate this, it is terrible.", "Awful misery and sadness."], layers=(10, 15),
        method="mean_diff", progress=False)
s.mix.set("happy", s.vectors["happy"], {OLD})
m = Mixer(s)
slider = m.rows["happy"].coef
h = s.start("Tell me about your day.", max_new_tokens={STEPS}, ignore_eos=True,
            on_event=lambda e: time.sleep(0.05))   # at most 20 steps/s: a window to act in
m.follow(h)
view = TokenView(h, session=s)
display(m, view)
row = m.rows["happy"]
print(json.dumps([ipykernel.__version__, slider.model_id, view.model_id, row.layer.model_id,
                  row.on.model_id]))
"""


@pytest.fixture(scope="module", params=IPYKERNEL_MAJORS,
                ids=[f"ipykernel{m}" for m in IPYKERNEL_MAJORS])
def kernel(request):
    """A kernel of that ipykernel major version, with SETUP run: ``ids`` holds the kernel's
    ipykernel version, the slider's and the view's comm ids."""
    k = Kernel(ipykernel_env(request.param, request.config.cache.mkdir("max_jupyter_kernels")))
    k.major = request.param
    k.ids = json.loads(k.run(SETUP, timeout=300))
    yield k
    k.close()


def steps_now(kernel: Kernel) -> int:
    return int(kernel.run("print(h.step)"))


def test_slider_message_mid_run_changes_later_steps_only(kernel):
    version, slider_id, view_id, _, _ = kernel.ids
    assert int(version.split(".")[0]) == kernel.major
    deadline = time.monotonic() + 120
    while steps_now(kernel) < 5:
        assert time.monotonic() < deadline, "the generation made no progress"
        time.sleep(0.1)
    before = steps_now(kernel)
    kernel.update_widget(slider_id, {"value": NEW})
    after, coef = kernel.run("print(h.step, s.mix.entries['happy'].coef)").split()
    after = int(after)
    assert float(coef) == NEW, "the slider's comm_msg did not reach the mix"
    coefs = json.loads(kernel.run("r = h.result(timeout=300)\n"
                                  "print(json.dumps([st.live_coefs['happy'] for st in r.steps]))"))
    assert len(coefs) == STEPS and after < STEPS, "the generation ended before the message"
    switch = coefs.index(NEW)
    assert coefs == [OLD] * switch + [NEW] * (STEPS - switch)
    assert before <= switch <= after + 1, (before, switch, after)

    # The TokenView's deltas (custom comm messages) rebuild every step with its coefficient.
    kernel.run("t0 = time.time()\n"
               "while not view.status.startswith('done') and time.time() - t0 < 30:\n"
               "    time.sleep(0.05)")
    rows = rebuild_rows(kernel.seen, view_id)
    assert [row["live_coefs"]["happy"] for row in rows] == coefs
    assert all(row["big"] for row in rows), "top-k alternatives missing after the end"


def test_the_view_leaves_a_static_copy_of_the_final_text(kernel):
    """Displayed, the view is followed by an HTML output (the copy a saved notebook keeps);
    at the end it is rewritten with the text, one coloured span per token, and the live
    mix per step."""
    kernel.run("h.result(timeout=300)\n"
               "t0 = time.time()\n"
               "while not view.status.startswith('done') and time.time() - t0 < 30:\n"
               "    time.sleep(0.05)\n"
               "time.sleep(0.5)")
    displays = [m["content"] for m in kernel.seen if m["msg_type"] == "display_data"]
    at = [d["data"].get(WIDGET, {}).get("model_id") for d in displays].index(kernel.ids[2])
    copy = displays[at + 1]
    assert "mj-fallback" in copy["data"]["text/html"], "no static copy under the view"
    copy_id = copy["transient"]["display_id"]
    updates = [m["content"]["data"]["text/html"] for m in kernel.seen
               if m["msg_type"] == "update_display_data"
               and m["content"]["transient"]["display_id"] == copy_id]
    assert updates, "the static copy was not brought up to date at the end"
    last = updates[-1]
    text, coefs = json.loads(kernel.run(
        "r = h.result()\nprint(json.dumps([r.text, [st.live_coefs['happy'] for st in r.steps]]))"))
    assert len(re.findall(r'<span class="mj-tok[^"]*" style=', last)) == STEPS
    assert text in html.unescape(re.sub(r"<[^>]+>", "", last))
    switch = coefs.index(NEW)
    assert (f"live mix per step: 0-{switch - 1} happy +{OLD:.2f}; {switch}-{STEPS - 1} happy "
            f"+{NEW:.2f}") in last
    assert f"live mix at start: happy +{OLD:.2f}" in last, "the copy hides the mix it began with"
    status = kernel.run("print(view.status)")
    assert status.startswith("done") and f"live mix at start: happy +{OLD:.2f}" in status


def test_a_slider_value_is_recorded_without_float_noise(kernel):
    """The browser sends ``min + n * step`` (here -2 + 39 * 0.05); the mix, and so every
    step's ``live_coefs``, holds -0.05."""
    kernel.update_widget(kernel.ids[1], {"value": -2 + 39 * 0.05})
    assert kernel.run("print(repr(s.mix.entries['happy'].coef))").strip() == "-0.05"
    out = kernel.run("r = s.generate('Hi', max_new_tokens=2)\n"
                     "from max_jupyter.jupyter import summary\n"
                     "print(repr(r.steps[0].live_coefs['happy']), summary(r))")
    assert out.startswith("-0.05 ") and "live mix at start: happy -0.05" in out


def test_a_view_rendered_late_gets_every_token(kernel):
    """A page that renders the view after the run asks for the rows ("sync") and gets all."""
    view_id = kernel.ids[2]
    kernel.run("h.result(timeout=300)")
    kernel.seen.clear()
    kernel.send_custom(view_id, {"type": "sync"})
    assert int(kernel.run("print(len(view.records))")) == STEPS
    rows = rebuild_rows(kernel.seen, view_id)
    assert [row["step"] for row in rows] == list(range(STEPS))
    assert all(row["big"] for row in rows)


def test_mix_changed_in_code_moves_the_slider(kernel):
    slider_id = kernel.ids[1]
    kernel.seen.clear()
    kernel.run("s.mix.set_coef('happy', 1.25); s.mix.set_coef('happy', 3.5)")
    states = [m["content"]["data"]["state"] for m in kernel.seen
              if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == slider_id
              and m["content"]["data"].get("method") == "update"]
    values = [st["value"] for st in states if "value" in st]
    assert values[-2:] == [1.25, 3.5]
    assert any(st.get("max", 0) >= 3.5 for st in states), "the slider range did not widen"
    assert kernel.run("print(m.rows['happy'].on.value, s.mix.entries['happy'].coef)").split() \
        == ["True", "3.5"]


def test_a_slider_float_step_is_not_recorded_as_noise(kernel):
    """A slider's value is steps of floats (0.1 + 0.2 = 0.30000000000000004); the mix gets
    the number meant."""
    kernel.update_widget(kernel.ids[1], {"value": 0.1 + 0.2})
    assert kernel.run("print(repr(s.mix.entries['happy'].coef))").strip() == "0.3"


def test_layer_choice_and_switch_write_the_mix(kernel):
    _, _, _, layer_id, on_id = kernel.ids
    entry = "e = s.mix.entries.get('happy'); print(e and e.layers)"
    kernel.run("s.mix.set_coef('happy', 0.3)")
    kernel.update_widget(layer_id, {"index": 2})  # the dropdown's third option: layer 15
    assert kernel.run(entry).strip() == "(15,)"
    kernel.update_widget(on_id, {"value": False})
    assert kernel.run(entry).strip() == "None"
    kernel.update_widget(on_id, {"value": True})
    assert kernel.run(entry + "; print(e.coef)").split() == ["(15,)", "0.3"]


def test_max_steer_mixer_and_max_steer_on(kernel):
    out = kernel.run("%load_ext max_jupyter\n%max_load --session s\nmm = %max_steer mixer\n"
                     "print(type(mm).__name__, mm.session is s, *mm.rows)")
    assert out.splitlines()[-1].split() == ["Mixer", "True", "happy"]
    kernel.seen.clear()
    kernel.run("%max_steer mixer")
    shown = [m["content"]["data"] for m in kernel.seen if m["msg_type"] == "display_data"]
    assert len(shown) == 2 and WIDGET in shown[0], "the Mixer, then its static copy"
    assert "mj-fallback" in shown[1]["text/html"] and "live mix: happy" in shown[1]["text/html"]
    kernel.run("%max_steer on happy 0.9")
    assert kernel.run("print(mm.rows['happy'].coef.value, m.rows['happy'].coef.value)").split() \
        == ["0.9", "0.9"]


def test_vector_added_to_the_library_gets_a_row(kernel):
    kernel.run("s.vectors['sad'] = -s.vectors['happy']")
    deadline = time.monotonic() + 10
    while kernel.run("print('sad' in m.rows)").strip() != "True":
        assert time.monotonic() < deadline, "no row for the new vector"
        time.sleep(0.1)
    assert kernel.run("print(m.rows['sad'].on.value, 'sad' in s.mix)").split() == ["False", "False"]


def test_stop_button_stops_only_its_own_generation(kernel):
    """``m`` follows ``h`` (ended): another generation neither shows in it nor is stopped
    by it; a Mixer following that generation stops it."""
    stop_id, stop2_id = kernel.run(
        "h2 = s.start('Count to one hundred.', max_new_tokens=400, "
        "on_event=lambda e: time.sleep(0.05))\n"
        "m2 = Mixer(s, h2)\nprint(m.stop_button.model_id, m2.stop_button.model_id)").split()
    deadline = time.monotonic() + 60
    while kernel.run("print(m2.stop_button.disabled, h2.step > 2)").split() != ["False", "True"]:
        assert time.monotonic() < deadline, "the Stop button was not enabled for the generation"
        time.sleep(0.1)
    assert kernel.run("print(m.stop_button.disabled, h.state in m.status.value, "
                      "f'<b>{h.step}</b>' in m.status.value)").split() == ["True"] * 3
    kernel.send_custom(stop_id, {"event": "click"})  # disabled on the page; sent anyway
    time.sleep(0.5)
    assert kernel.run("print(h2.state)").strip() == "running"
    kernel.send_custom(stop2_id, {"event": "click"})
    out = kernel.run("r2 = h2.result(timeout=60); time.sleep(0.5)\n"
                     "print(h2.state, len(r2.steps), m2.stop_button.disabled, m2.status.value)")
    state, steps, disabled, *status = out.split()
    assert (state, disabled) == ("stopped", "True") and int(steps) < 400
    assert "stopped" in " ".join(status) and steps in " ".join(status)


def test_a_closed_view_stops_listening(kernel):
    n, later, steps = map(int, kernel.run(
        "h3 = s.start('Hi', max_new_tokens=40, ignore_eos=True, on_event=lambda e: time.sleep(0.05))\n"
        "v3 = TokenView(h3, session=s)\n"
        "while len(v3.records) < 3: time.sleep(0.02)\n"
        "v3.close(); n = len(v3.records)\n"
        "r3 = h3.result(timeout=60); time.sleep(0.3)\n"
        "print(n, len(v3.records), len(r3.steps))").split())
    assert later <= n + 1 < steps == 40


def test_widgets_of_a_closed_session_say_so_and_disable_themselves(kernel):
    """``%max_load`` again closes ``s``: its Mixers (alone and in a LiveView) disable
    every control and say why, the LiveView's TokenView too; a slider message sent to an
    old Mixer changes nothing. (Last: it closes the module's session.)"""
    kernel.run("%%max_generate --live -n 3 -v live\nHi")
    kernel.run("live.handle.result(timeout=60)\n%max_load --store :memory:")
    deadline = time.monotonic() + 10
    check = ("print(all(w.disabled for r in [*m.rows.values(), *live.mixer.rows.values()] "
             "for w in (r.on, r.coef, r.layer)), m.stop_button.disabled, "
             "'session closed' in m.status.value, 'session closed' in live.mixer.status.value, "
             "live.view.closed, live.view.status.endswith('session closed'))")
    while kernel.run(check).split() != ["True"] * 6:
        assert time.monotonic() < deadline, kernel.run(check)
        time.sleep(0.1)
    before = kernel.run("print(s.mix.entries['happy'].coef)").strip()
    kernel.update_widget(kernel.ids[1], {"value": -1.5})
    assert kernel.run("print(s.mix.entries['happy'].coef)").strip() == before
    assert "session closed" in kernel.run("print(m.fallback.html)")


def rebuild_rows(messages: list[dict], view_id: str) -> list[dict]:
    """The rows a page would hold after the view's ``tokens`` messages, in order."""
    rows: list[dict] = []
    for msg in messages:
        content = msg["content"]
        if msg["msg_type"] != "comm_msg" or content.get("comm_id") != view_id:
            continue
        data = content["data"]
        if data.get("method") != "custom" or data["content"].get("type") != "tokens":
            continue
        body = data["content"]
        rows[body["start"]:] = body["tokens"]
        del rows[body["n"]:]
    return rows


def test_flush_rate_is_bounded():
    """20 Hz at most however fast events come; the last poke is always flushed."""
    from max_jupyter.jupyter.tokenview import _Flusher

    calls: list[float] = []
    flusher = _Flusher(lambda: calls.append(time.monotonic()), 1 / 20)
    flusher.start()
    stop = time.monotonic() + 1.0
    while time.monotonic() < stop:
        flusher.poke()
        time.sleep(0.001)
    flusher.stop()
    gaps = [b - a for a, b in zip(calls, calls[1:-1])]  # the final flush comes from stop()
    assert len(calls) <= 1.0 * 20 + 2
    assert min(gaps) >= 0.045, min(gaps)
    assert len(calls) >= 10, "flushes should keep coming while pokes do"


def test_the_front_end_files_ship_as_package_data():
    """The TokenView reads tokenview.js / .css at run time: the wheel must carry them."""
    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data.get("package-data", {}).get("max_jupyter.jupyter", [])
    for name in ("tokenview.js", "tokenview.css"):
        assert (root / "max_jupyter" / "jupyter" / name).is_file()
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} is not package data"
