"""``TokenView``: a generation's tokens, streamed into the notebook as they come.

One span per token, coloured by a judge's score, steered tokens underlined, re-run tokens
boxed; hovering shows the step's scores, the steering it ran with (the live mix's
coefficients and the judged mixes) and, once the generation has ended, the top-k
alternatives of both models. A click selects a step: ``view.selected`` is then that
step's record and tensors.

``follow(handle)`` listens to the handle's event pump (``GenerationHandle.subscribe``) and
sends the new rows to the page as deltas, at most ``max_hz`` times a second. The front end
is ``tokenview.js`` / ``tokenview.css`` next to this file (anywidget reads them: no build
step, nothing fetched from the network). Displayed, the view is followed by its static copy
(``fallback``): the final text with its token colouring and the live mix per step, kept in
the saved notebook.
"""
from __future__ import annotations

import html
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anywidget
import ipywidgets
import traitlets

from max_jupyter.jupyter.fallback import ShownWithFallback, StaticFallback
from max_jupyter.jupyter.mixer import Mixer
from max_jupyter.jupyter.render import mix_words, result_html
from max_jupyter.orchestrator.trace import GenerationResult, StepEvent, StepRecord

WAITING = "the generation had not ended when this copy was made; its text appears here when it ends"


@dataclass(frozen=True)
class SelectedStep:
    """The step a click selected: its ``record``, the ``text`` it showed and ``tensors``:
    that step's row of every per-step tensor of the result (``big_hidden`` / ``small_hidden``
    / ``deltas``: layer -> ``[hidden]``; ``big_topk`` / ``first_pass_topk`` / ``small_topk``:
    ``(ids [k], logits [k])``; ``big_logits`` / ``small_logits``: ``[vocab]`` when traced).
    ``tensors`` is empty until the generation has ended (rows are stacked at the end)."""

    step: int
    record: StepRecord
    text: str
    tensors: dict[str, Any] = field(default_factory=dict)


class TokenView(ShownWithFallback, anywidget.AnyWidget):
    """Tokens of a generation as an interactive widget.

    ``TokenView(handle, session=s)`` follows a running ``GenerationHandle`` at once;
    ``session`` gives the tokenizers that spell the top-k alternatives (without it they
    show as ids). Traits: ``selected_step`` (the clicked step, -1 for none; synced both
    ways), ``status`` (shown above the tokens), ``judge`` (whose score colours the tokens;
    empty: the first judge; ``"probe:joy"``: the probe readings of a generation made with
    ``probes=["joy"]``, once it has ended), ``closed`` (the session is closed: the view says so and takes
    no clicks). ``records`` and ``result`` hold what has arrived; ``fallback`` is the static
    copy shown under the view.
    """

    _esm = Path(__file__).with_name("tokenview.js")
    _css = Path(__file__).with_name("tokenview.css")
    selected_step = traitlets.Int(-1).tag(sync=True)
    status = traitlets.Unicode("waiting for tokens").tag(sync=True)
    judge = traitlets.Unicode("").tag(sync=True)
    closed = traitlets.Bool(False).tag(sync=True)

    def __init__(self, handle=None, *, session=None, max_hz: float = 20.0, **kwargs):
        super().__init__(**kwargs)
        self._session = session
        self._big_tok = session.big.tokenizer if session is not None else None
        small = getattr(session, "small", None)
        self._small_tok = small.tokenizer if small is not None else None
        self.records: list[StepRecord] = []
        self.result: GenerationResult | None = None
        self.fallback = StaticFallback(html.escape(WAITING))
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._dirty_from: int | None = None
        self._status = self.status
        self._handle = self._listener = self._flusher = None
        self._start = ""  # " · live mix at start: ..." once the first step has come
        self._interval = 1.0 / max_hz
        self.on_msg(self._on_page)
        if handle is not None:
            self.follow(handle)

    def follow(self, handle) -> None:
        """Show ``handle``'s generation (from its first step), replacing what was shown."""
        self._unfollow()
        flusher = _Flusher(self._flush, self._interval)
        with self._lock:
            self.records, self._rows, self.result, self._start = [], [], None, ""
            self._dirty_from, self._status = 0, f"{handle.state} · step 0"
            self._handle, self._flusher = handle, flusher
        self.fallback.update(html.escape(WAITING))
        flusher.start()
        flusher.poke()
        self._listener = handle.subscribe(lambda event: self._on_event(handle, event, flusher),
                                          lambda ended: self._on_end(ended, flusher))

    def _unfollow(self) -> None:
        """Stop listening to the generation shown until now (if any)."""
        listener = getattr(self, "_listener", None)  # absent if __init__ failed (__del__ closes)
        if listener is not None:
            handle, flusher = self._handle, self._flusher
            handle.unsubscribe(listener)
            flusher.stop()

    def close(self) -> None:
        """Stop following the generation and close the widget."""
        self._unfollow()
        super().close()

    def _on_event(self, handle, event: StepEvent, flusher: _Flusher) -> None:
        if self._handle is handle:  # else follow() has moved on to another generation
            self._push(event)
            flusher.poke()

    def _on_end(self, handle, flusher: _Flusher) -> None:
        """The generation ended: its result (also a partial one), the static copy."""
        if self._handle is handle:
            self._finish(_outcome(handle), handle.state)
            if self._session is not None and self._session.closed:
                self.mark_closed()
        flusher.stop()
        if self._handle is handle:
            self.fallback.update(self.static_html())

    def _push(self, event: StepEvent) -> None:
        """Add one step event (any thread); it reaches the page with the next batch."""
        with self._lock:
            if event.record is None:  # text held back to the end belongs to the last token
                if not self._rows:
                    return
                self._rows[-1]["text"] += event.text
                self._mark(len(self._rows) - 1)
            else:
                if not self.records:
                    # step 0's live coefficients: the result's start_mix, known before the end
                    self._start = f" · live mix at start: {mix_words(event.record.live_coefs)}"
                self.records.append(event.record)
                self._rows.append(self._row(event.record, event.text))
                self._mark(len(self._rows) - 1)
                self._status = f"running · step {len(self._rows)}{self._start}"

    def _finish(self, result: GenerationResult | None, state: str) -> None:
        """The generation ended in ``state`` with ``result`` (None if there is none):
        add both models' top-k alternatives to every token and show the outcome."""
        with self._lock:
            self.result = result
            if result is not None:
                self._add_alternatives(result)
                for concept, scores in result.probe_scores.items():  # colour by "probe:<concept>"
                    for row, score in zip(self._rows, scores.tolist()):
                        row["scores"][f"probe:{concept}"] = _finite(score)
                rate = f" · {result.tokens_per_s:.1f} tok/s" if result.elapsed_s else ""
                self._status = (f"{state} · {result.finish_reason} · {len(result.steps)} tokens"
                                f"{rate}{self._start}")
            else:
                self._status = state
            self._mark(0)

    def mark_closed(self) -> None:
        """The session is closed: say so above the tokens and take no more clicks."""
        with self._lock:
            if not self._status.endswith("session closed"):
                self._status += " · session closed"
        self.closed = True
        self.status = self._status

    def static_html(self) -> str:
        """The static copy: the result's text with its token colouring (a tooltip per token)
        and summary, and the live mix per step; a note while there is no result."""
        result = self.result
        if result is None:
            return html.escape(self._status)
        return (result_html(result, self._big_tok, self._small_tok, self.judge or None)
                + f'<div class="mj-summary">{html.escape(mix_per_step(result.steps))}</div>')

    @property
    def selected(self) -> SelectedStep | None:
        """The clicked step's record and tensors, or None when nothing is selected."""
        step = self.selected_step
        with self._lock:
            if not 0 <= step < len(self.records):
                return None
            record, text, result = self.records[step], self._rows[step]["text"], self.result
        return SelectedStep(step, record, text, _step_tensors(result, step) if result else {})

    def _mark(self, index: int) -> None:
        self._dirty_from = index if self._dirty_from is None else min(self._dirty_from, index)

    def _flush(self) -> None:
        """Send the rows changed since the last flush (in order with every other send)."""
        with self._lock:
            start, self._dirty_from = self._dirty_from, None
            if start is not None:
                self._send_rows(start)
            status = self._status
        self.status = status

    def _send_rows(self, start: int) -> None:
        self.send({"type": "tokens", "start": start, "n": len(self._rows),
                   "tokens": self._rows[start:]})

    def _on_page(self, _widget, content: dict, _buffers) -> None:
        """A view was rendered: send it every row."""
        if isinstance(content, dict) and content.get("type") == "sync":
            with self._lock:
                self._send_rows(0)

    def _row(self, record: StepRecord, text: str) -> dict:
        """A step as the page gets it (keys: see tokenview.js)."""
        return {"step": record.step, "text": text, "token": record.token,
                "token_text": _spell(self._big_tok, record.token),
                "model_prob": _finite(record.model_prob), "sampler_prob": _finite(record.sampler_prob),
                "scores": {k: _finite(v) for k, v in record.scores.items()},
                "mixes_on": list(record.mixes_on), "live_coefs": dict(record.live_coefs),
                "steered": record.steered, "rerun": record.rerun, "changed": record.changed,
                "first_pass_text": _spell(self._big_tok, record.unsteered_token) if record.rerun else None,
                "big": None, "small": None}

    def _add_alternatives(self, result: GenerationResult) -> None:
        for name, topk, tok in (("big", result.big_topk, self._big_tok),
                                ("small", result.small_topk, self._small_tok)):
            if topk is None:
                continue
            for row, ids, logits in zip(self._rows, topk.ids.tolist(), topk.logits.tolist()):
                row[name] = [[_spell(tok, i), _finite(l)] for i, l in zip(ids, logits)]


class LiveView(ShownWithFallback, ipywidgets.VBox):
    """What ``%%max_generate --live`` shows: a ``Mixer`` of the session (``mixer``) bound to
    ``handle`` above a TokenView (``view``) following it. Its static copy is the view's."""

    def __init__(self, session, handle):
        self.handle = handle
        self.view = TokenView(handle, session=session)
        self.mixer = Mixer(session, handle)
        self.mixer.on_session_closed(self.view.mark_closed)
        self.fallback = self.view.fallback
        super().__init__([self.mixer, self.view])

    def close(self) -> None:
        self.mixer.close()
        self.view.close()
        super().close()


def mix_per_step(records: list[StepRecord]) -> str:
    """The live mix's coefficients per step as runs of equal steps, e.g. ``live mix per
    step: 0-12 happy +0.00; 13-59 happy +0.80``."""
    runs: list[list] = []  # [first step, last step, the coefficients as shown]
    for record in records:
        shown = mix_words(record.live_coefs)  # compared as shown: 0.3 and 0.30000000000000004 are one run
        if runs and runs[-1][2] == shown:
            runs[-1][1] = record.step
        else:
            runs.append([record.step, record.step, shown])
    parts = [(f"{a}" if a == b else f"{a}-{b}") + f" {shown}" for a, b, shown in runs]
    return "live mix per step: " + ("; ".join(parts) if parts else "no steps")


class _Flusher:
    """Calls ``flush`` on a thread of its own after each ``poke``, at most once per
    ``interval`` seconds; ``stop`` ends the thread and flushes what is left."""

    def __init__(self, flush: Callable[[], None], interval: float):
        self._flush, self._interval = flush, interval
        self._poked, self._stopped = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="max-tokenview-flush")

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._poked.set()

    def stop(self) -> None:
        self._stopped.set()
        self._poked.set()
        self._thread.join()
        self._flush()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._poked.wait()
            self._poked.clear()
            self._flush()
            self._stopped.wait(self._interval)


def _outcome(handle) -> GenerationResult | None:
    """The ended generation's result, or the partial one its error carries."""
    try:
        return handle.result()
    except Exception as e:
        return getattr(e, "result", None)


def _step_tensors(result: GenerationResult, step: int) -> dict[str, Any]:
    """Row ``step`` of every per-step tensor of ``result`` (absent ones left out)."""
    rows: dict[str, Any] = {
        "big_hidden": {l: t[step] for l, t in result.big_hidden.items()},
        "small_hidden": {l: t[step] for l, t in result.small_hidden.items()},
        "deltas": {l: t[step] for l, t in result.deltas.items()},
    }
    for name in ("big_topk", "first_pass_topk", "small_topk"):
        topk = getattr(result, name)
        if topk is not None and len(topk.ids) > step:
            rows[name] = (topk.ids[step], topk.logits[step])
    for name in ("big_logits", "small_logits"):
        logits = getattr(result, name)
        if logits is not None:
            rows[name] = logits[step]
    return rows


def _spell(tokenizer, token: int | None) -> str:
    if token is None:
        return ""
    return tokenizer.token_text(token) if tokenizer is not None else f"<{token}>"


def _finite(x: float | None) -> float | None:
    """JSON has no NaN: a missing or non-finite number becomes null."""
    return float(x) if x is not None and math.isfinite(x) else None
