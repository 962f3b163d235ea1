"""``%%max_generate --live`` (the Mixer over a TokenView) in a real browser: JupyterLab 4
and Notebook 7, served on 127.0.0.1 (a token, temporary config / data / runtime /
workspace / settings folders), and the distribution's Chromium driven by Playwright
(``executable_path``; no browser is downloaded).

A generated notebook is run with Run > Run All Cells; while its background generation
runs, a mixer slider is moved with the keyboard; the page's token spans then show the
new coefficient from a step after the move on, one span per step with a tooltip, and a
click on a token sets ``view.selected`` in the kernel (read by a second kernel client).
Screenshots go to the test's tmp folder, or to $MAX_JUPYTER_SCREENSHOTS (printed).
Without Chromium or Playwright the test skips outside CI and fails in CI (``CI=true``).
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import free_port
from jupyter_kernels import IPYKERNEL_MAJORS, Kernel, ipykernel_env, missing

pytestmark = pytest.mark.slow  # a Jupyter server and the embedded model

CHROMIUM = os.environ.get("MAX_JUPYTER_CHROMIUM", "/usr/bin/chromium")
OLD, NEW = 0.0, 0.5
LOW, HIGH, STEP = -2.0, 2.0, 0.05  # the Mixer's default slider range and step
PRESSES = round((NEW - OLD) / STEP)
TOKENS = 36
UIS = [("lab", major) for major in IPYKERNEL_MAJORS] + [("notebook7", IPYKERNEL_MAJORS[0])]
"""JupyterLab 4 on both ipykernel major versions; Notebook 7 (the same server) on one."""

SETUP = """\
import time
from max_jupyter import Session
from max_jupyter.orchestrator import DivergenceJudge, FunctionJudge, ProbeJudge
from max_jupyter.steering import Mix
s = Session.load(small="same", store=None, progress=False)
happy = s.train("happy", ["I love this, it is wonderful!", "Great joy and happiness."],
                ["I hate this, it is terrible.", "Awful misery and sadness."], layers=(10, 15),
                method="mean_diff", progress=False)
s.mixes["cheer"] = Mix.of(happy, 0.3)
s.judges["probe"] = ProbeJudge(happy, layer=10, threshold=40.0, mix="cheer")
s.judges["unsure"] = DivergenceJudge(threshold=3.0, mix="cheer")
# Test pacing: a judge that only waits, so the slider can move while tokens still come.
s.judges["pace"] = FunctionJudge(lambda ctx: time.sleep(0.15) or False, mix="cheer", name="pace")
s.defaults = s.defaults.replace(ignore_eos=True)
s.mix.set("happy", happy, %r)
""" % OLD

MAGICS = "%load_ext max_jupyter\n%max_load --session s"
LIVE = f"%%max_generate --live -n {TOKENS} -v live\nTell me a short story about a cat."


@pytest.fixture(scope="module")
def chromium():
    """Playwright's Chromium driver bound to the distribution's binary."""
    if not Path(CHROMIUM).exists():
        missing(f"Chromium is not at {CHROMIUM}: install it with `apt-get install -y chromium` "
                f"(or set MAX_JUPYTER_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    """A JupyterLab server with everything under a temporary folder and a kernel spec per
    ipykernel major version (``max-ipykernel7``, ``max-ipykernel6``)."""
    root = tmp_path_factory.mktemp("lab")
    dirs = {k: root / k for k in ("config", "data", "runtime", "workspaces", "settings", "ipython",
                                  "notebooks")}
    for d in dirs.values():
        d.mkdir()
    write_settings(dirs["settings"])
    cache = request.config.cache.mkdir("max_jupyter_kernels")
    for major in IPYKERNEL_MAJORS:
        write_kernel_spec(dirs["data"], major, ipykernel_env(major, cache))
    token, port = secrets.token_hex(16), free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(dirs["config"]),
           "JUPYTER_DATA_DIR": str(dirs["data"]), "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
           "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
           "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]), "IPYTHONDIR": str(dirs["ipython"])}
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={dirs['notebooks']}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(server, url, token, root / "lab.log")
        yield {"url": url, "token": token, "dirs": dirs}
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def write_settings(settings: Path) -> None:
    """No news or update checks (no network); start the notebook's kernel without asking."""
    for plugin, values in {"apputils-extension/notification": {"fetchNews": "false",
                                                               "checkForUpdates": False},
                           "notebook-extension/tracker": {"autoStartDefaultKernel": True}}.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def write_kernel_spec(data: Path, major: int, env: dict[str, str]) -> None:
    spec = data / "kernels" / f"max-ipykernel{major}"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python (ipykernel {major})", "language": "python", "env": env}))


def wait_for_server(server: subprocess.Popen, url: str, token: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return
        except OSError:
            assert server.poll() is None, f"JupyterLab exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"JupyterLab did not start:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)


def write_notebook(folder: Path, ui: str, major: int, cells=(SETUP, MAGICS, LIVE),
                   name: str | None = None) -> str:
    """A notebook of code ``cells`` for the kernel of ipykernel ``major`` (its file name)."""
    name = name or f"live-{ui}-ipykernel{major}.ipynb"
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {
        "name": f"max-ipykernel{major}", "display_name": f"Python (ipykernel {major})",
        "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, folder / name)
    return name


def run_all_cells(page) -> None:
    """Run > Run All Cells, once the kernel is idle (retried if the click came too early)."""
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    for _ in range(3):
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
        try:
            page.wait_for_function("() => !document.querySelector('.jp-InputPrompt')"
                                   ".textContent.includes('[ ]')", timeout=10_000)
            return
        except Exception:  # playwright's TimeoutError: the command did not take; try again
            continue
    raise AssertionError("Run All Cells did not start the notebook")


def page_tokens(page) -> list[dict]:
    """Every token span of the view: its step, text, live-mix coefficients and tooltip."""
    return page.eval_on_selector_all(".max-tokenview .tv-tok", """spans => spans.map(s => ({
        step: Number(s.dataset.step), text: s.textContent, mix: JSON.parse(s.dataset.mix),
        tip: s.dataset.tip, steered: s.classList.contains("tv-steered")}))""")


@pytest.mark.parametrize("ui, major", UIS, ids=[f"{ui}-ipykernel{major}" for ui, major in UIS])
def test_live_mixer_and_token_view_in_the_browser(chromium, lab, ui, major, tmp_path):
    name = write_notebook(lab["dirs"]["notebooks"], ui, major)
    shots = Path(os.environ.get("MAX_JUPYTER_SCREENSHOTS", tmp_path)) / f"{ui}-ipykernel{major}"
    shots.mkdir(parents=True, exist_ok=True)
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    path = (f"lab/workspaces/{ui}{major}/tree/{name}?reset&" if ui == "lab"
            else f"notebooks/{name}?")  # Notebook 7: one document per page
    page.goto(f"{lab['url']}/{path}token={lab['token']}")
    try:
        run_all_cells(page)
        page.wait_for_function("() => document.querySelectorAll('.max-tokenview .tv-tok').length >= 3",
                               timeout=300_000)
        before, after = move_slider(page, ui)
        page.wait_for_function("() => (document.querySelector('.max-tokenview .tv-head') || {})"
                               ".textContent?.startsWith('done')", timeout=300_000)
        page.screenshot(path=str(shots / "after-run.png"))
        tokens = page_tokens(page)
        check_coefficients(tokens, before, after)
        check_tooltip(page, tokens, shots)
        check_click_selects(page, lab, tokens, major)
    finally:
        page.screenshot(path=str(shots / "last.png"))
        print(f"screenshots in {shots}")
        page.close()


def move_slider(page, ui: str) -> tuple[int, int]:
    """Move the 'happy' coefficient slider to NEW — with the keyboard (focus the handle,
    press ArrowRight) in JupyterLab; in Notebook 7, whose command-mode shortcuts take the
    arrow keys from a focused output, with a click on the track — and return how many
    tokens the page showed before the move and after it."""
    slider = page.locator(".max-mixer-row-happy .max-mixer-coef")
    handle = slider.locator(".noUi-handle")
    handle.click()  # focuses it (a click on the handle itself does not move it)
    before = len(page_tokens(page))
    if ui == "lab":
        for _ in range(PRESSES):
            page.keyboard.press("ArrowRight")
    else:
        track = slider.locator(".noUi-target")
        box = track.bounding_box()
        track.click(position={"x": box["width"] * (NEW - LOW) / (HIGH - LOW), "y": box["height"] / 2})
    assert slider.locator(".widget-readout").inner_text() == f"{NEW:.2f}"
    after = len(page_tokens(page))
    assert after < TOKENS - 5, f"the generation was nearly over ({after} tokens) when the slider moved"
    return before, after


def check_coefficients(tokens: list[dict], before: int, after: int) -> None:
    """The old coefficient on every token shown before the first key press; then (through
    the values of the single key steps) the new one, from shortly after the last press on."""
    assert [t["step"] for t in tokens] == list(range(TOKENS)), "one span per step, in order"
    coefs = [t["mix"]["happy"] for t in tokens]
    assert coefs[:before] == [OLD] * before
    assert coefs == sorted(coefs), coefs
    first_new = coefs.index(NEW)
    assert coefs[first_new:] == [NEW] * (TOKENS - first_new)
    # A step may be in flight, and one more not yet on the page, when the last key is pressed.
    assert first_new <= after + 3, (before, after, coefs)
    assert all(t["steered"] for t in tokens[first_new:]), "tokens with the new coefficient not marked"


def check_tooltip(page, tokens: list[dict], shots: Path) -> None:
    assert all("score: probe" in t["tip"] and "live mix: happy=" in t["tip"] for t in tokens)
    assert all("big top-k:" in t["tip"] and "small top-k:" in t["tip"] for t in tokens)
    last = page.locator(".max-tokenview .tv-tok").nth(TOKENS - 1)
    last.hover()
    tip = page.locator(".max-tokenview .tv-tip")
    tip.wait_for(state="visible")
    assert f"happy={NEW:.2f}" in tip.inner_text()
    page.screenshot(path=str(shots / "tooltip.png"))


def check_click_selects(page, lab, tokens: list[dict], major: int) -> None:
    """A click on token 7 sets ``view.selected`` in the kernel (a second client reads it)."""
    page.locator(".max-tokenview .tv-tok").nth(7).click()
    files = sorted(lab["dirs"]["runtime"].glob("kernel-*.json"), key=lambda p: p.stat().st_mtime)
    kernel = Kernel(connection_file=str(files[-1]))
    try:
        deadline = time.monotonic() + 30
        while True:
            out = kernel.run("import ipykernel; sel = live.view.selected\n"
                             "print(ipykernel.__version__.split('.')[0], live.view.selected_step, "
                             "sel and sel.record.step, sel and sel.record.live_coefs['happy'], "
                             "sel and sorted(sel.tensors))")
            if out.split()[1] == "7" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        kernel.close()
    version, step, record_step, coef, rest = out.split(maxsplit=4)
    assert (int(version), int(step), int(record_step)) == (major, 7, 7)
    assert float(coef) == tokens[7]["mix"]["happy"]
    assert "big_topk" in rest and "small_topk" in rest
    assert "tv-selected" in page.locator(".max-tokenview .tv-tok").nth(7).get_attribute("class")


# ------------------------------------------- issue 21: what the notebook shows is true

QUICK_SETUP = """\
from max_jupyter import Session
s = Session.load(store=None, progress=False)
happy = s.train("happy", ["I love this, it is wonderful!", "Great joy and happiness."],
                ["I hate this, it is terrible.", "Awful misery and sadness."], layers=(10, 15),
                method="mean_diff", progress=False)
s.mix.set("happy", happy, 0.0)
"""
QUICK_LIVE = "%%max_generate --live -n 12 -v live\nTell me a short story about a cat."
LAB_MAJOR = IPYKERNEL_MAJORS[0]


def open_lab(chromium, lab, name: str, tmp_path, folder: str):
    """A page showing notebook ``name`` in JupyterLab, and the folder for its screenshots."""
    shots = Path(os.environ.get("MAX_JUPYTER_SCREENSHOTS", tmp_path)) / folder
    shots.mkdir(parents=True, exist_ok=True)
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{lab['url']}/lab/workspaces/{folder}/tree/{name}?reset&token={lab['token']}")
    return page, shots


def wait_done(page, index: int = 0) -> None:
    """Until the ``index``-th TokenView says its generation is done."""
    page.wait_for_function(
        f"() => (document.querySelectorAll('.max-tokenview .tv-head')[{index}] || {{}})"
        ".textContent?.startsWith('done')", timeout=300_000)


def result_summary(page, index: int, contains: str) -> str:
    """The summary line of the result in cell ``index`` once it holds ``contains``."""
    found = page.wait_for_function(
        f"""() => [...document.querySelectorAll('.jp-Notebook .jp-Cell')[{index}]
                   .querySelectorAll('.mj-result .mj-summary')]
                  .map(e => e.textContent).find(t => t.includes({contains!r}))""", timeout=120_000)
    return found.json_value()


def run_cell(page, index: int) -> None:
    """Select code cell ``index`` (its prompt area) and run it with Shift+Enter."""
    page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputPrompt").click()
    page.keyboard.press("Shift+Enter")


@pytest.mark.slow
def test_live_output_survives_save_restart_and_reload(chromium, lab, tmp_path):
    """Run a --live cell, save, restart the kernel, reload the page: the generated text is
    still shown (the widget's static copy, kept in the saved notebook)."""
    name = write_notebook(lab["dirs"]["notebooks"], "lab", LAB_MAJOR,
                          (QUICK_SETUP, MAGICS, QUICK_LIVE), "survives-restart.ipynb")
    page, shots = open_lab(chromium, lab, name, tmp_path, "survives")
    try:
        run_all_cells(page)
        wait_done(page)
        text = "".join(t["text"] for t in page_tokens(page))
        assert text.strip(), "no tokens shown"
        # The kernel rewrites the copy after the end (hidden while the widget shows).
        page.wait_for_function("() => document.querySelectorAll('.mj-fallback .mj-tok').length >= 12",
                               timeout=60_000)
        page.screenshot(path=str(shots / "1-live.png"))
        page.locator(".jp-Notebook .jp-Cell").first.locator(".jp-InputPrompt").click()
        page.keyboard.press("Control+s")
        saved = lab["dirs"]["notebooks"] / name
        deadline = time.monotonic() + 60
        while "mj-fallback" not in saved.read_text() or "mj-tok" not in saved.read_text():
            assert time.monotonic() < deadline, "the notebook was not saved with the copy"
            time.sleep(0.5)
        page.locator(".lm-MenuBar-item", has_text="Kernel").first.click()
        page.locator('.lm-Menu-item[data-command="kernelmenu:restart"]').click()
        page.locator(".jp-Dialog .jp-mod-accept").click()
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        page.reload()
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        copy = page.locator(".mj-fallback .mj-text").first
        copy.wait_for(state="visible", timeout=60_000)
        page.screenshot(path=str(shots / "2-after-restart-and-reload.png"))
        assert copy.inner_text().strip() == text.strip()
        assert "live mix at start: happy +0.00" in page.locator(".mj-fallback").first.inner_text()
    finally:
        page.screenshot(path=str(shots / "last.png"))
        print(f"screenshots in {shots}")
        page.close()


@pytest.mark.slow
def test_the_next_result_reports_the_mix_a_slider_left(chromium, lab, tmp_path):
    """A slider moved in one cell's Mixer steers the next cell; that cell's result says
    which live mix it began with (before the move: +0.00; re-run after it: -0.20)."""
    nxt = "%%max_generate -n 4\nHi"
    name = write_notebook(lab["dirs"]["notebooks"], "lab", LAB_MAJOR,
                          (QUICK_SETUP, MAGICS, QUICK_LIVE, nxt), "start-mix.ipynb")
    page, shots = open_lab(chromium, lab, name, tmp_path, "start-mix")
    try:
        run_all_cells(page)
        wait_done(page)
        assert "live mix at start: happy +0.00 ·" in result_summary(page, 3, "finish:")
        assert "live mix at start: happy +0.00" in page.locator(".max-tokenview .tv-head").inner_text()
        slider = page.locator(".max-mixer-row-happy .max-mixer-coef")
        slider.locator(".noUi-handle").click()
        readout = slider.locator(".widget-readout")
        for _ in range(8):  # a key step may be lost while the handle takes the focus
            if readout.inner_text().replace("\u2212", "-") == "-0.20":
                break
            page.keyboard.press("ArrowLeft")
        assert readout.inner_text().replace("\u2212", "-") == "-0.20"  # the readout's minus is U+2212
        run_cell(page, 3)
        line = result_summary(page, 3, "happy -0.20")
        page.screenshot(path=str(shots / "next-cell-reports-the-start-mix.png"))
        assert "live mix at start: happy -0.20 ·" in line
    finally:
        page.screenshot(path=str(shots / "last.png"))
        print(f"screenshots in {shots}")
        page.close()


@pytest.mark.slow
def test_max_load_again_disables_the_old_mixer(chromium, lab, tmp_path):
    """``%max_load`` closes the session: the old Mixer's controls are disabled on the page
    and it says why."""
    reload = "live.handle.result(timeout=120)\n%max_load --store :memory:"
    name = write_notebook(lab["dirs"]["notebooks"], "lab", LAB_MAJOR,
                          (QUICK_SETUP, MAGICS, QUICK_LIVE, reload), "reload.ipynb")
    page, shots = open_lab(chromium, lab, name, tmp_path, "reload")
    try:
        run_all_cells(page)
        page.wait_for_function("() => (document.querySelector('.max-mixer') || {})"
                               ".textContent?.includes('session closed')", timeout=300_000)
        row = page.locator(".max-mixer-row-happy")
        page.wait_for_function("() => document.querySelector('.max-mixer-row-happy input[type=checkbox]')"
                               ".disabled", timeout=30_000)
        page.screenshot(path=str(shots / "old-mixer-disabled.png"))
        assert row.locator("input[type=checkbox]").is_disabled()
        assert row.locator(".noUi-target").get_attribute("disabled") is not None
        assert "session closed" in page.locator(".max-tokenview .tv-head").inner_text()
        assert page.locator(".max-mixer button", has_text="Stop").is_disabled()
        # The new load shows one progress bar (ours; transformers' own are off).
        page.wait_for_function("() => !document.querySelectorAll('.jp-Notebook .jp-Cell')[3]"
                               ".querySelector('.jp-InputPrompt').textContent.includes('*')",
                               timeout=300_000)
        page.screenshot(path=str(shots / "new-session-loaded.png"))
        cell = page.locator(".jp-Notebook .jp-Cell").nth(3)
        assert cell.locator(".jp-OutputArea-child", has_text="loading:").count() == 1
        assert "Loading weights" not in cell.inner_text() and "100%" in cell.inner_text()
    finally:
        page.screenshot(path=str(shots / "last.png"))
        print(f"screenshots in {shots}")
        page.close()
