"""``TokenView``: a generation's tokens, streamed into the notebook as they come.

One span per token, coloured by a judge's score, steered tokens underlined, re-run tokens
boxed; hovering shows the step's scores, the steering it ran with (the live mix's
coefficients and the judged mixes) and, once the generation has ended, the top-k
alternatives of both models. A click selects a step: ``view.selected`` is then that
step's record and tensors.

``follow(handle)`` reads the handle's events on a thread of its own and sends the new rows
to the page as deltas, at most ``max_hz`` times a second (the front end is in
``tokenview_assets``: plain strings, no build step, nothing fetched from the network).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anywidget
import ipywidgets
import traitlets

from max_jupyter.orchestrator.trace import GenerationResult, StepEvent, StepRecord
from max_jupyter.jupyter.tokenview_assets import CSS, ESM


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


class TokenView(anywidget.AnyWidget):
    """Tokens of a generation as an interactive widget.

    ``TokenView(handle, session=s)`` follows a running ``GenerationHandle`` at once;
    ``session`` gives the tokenizers that spell the top-k alternatives (without it they
    show as ids). Traits: ``selected_step`` (the clicked step, -1 for none; synced both
    ways), ``status`` (shown above the tokens), ``judge`` (whose score colours the tokens;
    empty: the first judge). ``records`` and ``result`` hold what has arrived.
    """

    _esm = ESM
    _css = CSS
    selected_step = traitlets.Int(-1).tag(sync=True)
    status = traitlets.Unicode("waiting for tokens").tag(sync=True)
    judge = traitlets.Unicode("").tag(sync=True)

    def __init__(self, handle=None, *, session=None, max_hz: float = 20.0, **kwargs):
        super().__init__(**kwargs)
        self._big_tok = session.big.tokenizer if session is not None else None
        small = getattr(session, "small", None)
        self._small_tok = small.tokenizer if small is not None else None
        self.records: list[StepRecord] = []
        self.result: GenerationResult | None = None
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._dirty_from: int | None = None
        self._status = self.status
        self._handle = None
        self._interval = 1.0 / max_hz
        self.on_msg(self._on_page)
        if handle is not None:
            self.follow(handle)

    def follow(self, handle) -> None:
        """Show ``handle``'s generation (from its first step), replacing what was shown."""
        with self._lock:
            self.records, self._rows, self.result = [], [], None
            self._dirty_from, self._status = 0, f"{handle.state} · step 0"
            self._handle = handle
        threading.Thread(target=self._consume, args=(handle, _Flusher(self._flush, self._interval)),
                         daemon=True, name="max-tokenview").start()

    def _push(self, event: StepEvent) -> None:
        """Add one step event (any thread); it reaches the page with the next batch."""
        with self._lock:
            if event.record is None:  # text held back to the end belongs to the last token
                if not self._rows:
                    return
                self._rows[-1]["t"] += event.text
                self._mark(len(self._rows) - 1)
            else:
                self.records.append(event.record)
                self._rows.append(self._row(event.record, event.text))
                self._mark(len(self._rows) - 1)
                self._status = f"running · step {len(self._rows)}"

    def _finish(self, result: GenerationResult | None, state: str) -> None:
        """The generation ended in ``state`` with ``result`` (None if there is none):
        add both models' top-k alternatives to every token and show the outcome."""
        with self._lock:
            self.result = result
            if result is not None:
                self._add_alternatives(result)
                rate = f" · {result.tokens_per_s:.1f} tok/s" if result.elapsed_s else ""
                self._status = f"{state} · {result.finish_reason} · {len(result.steps)} tokens{rate}"
            else:
                self._status = state
            self._mark(0)

    @property
    def selected(self) -> SelectedStep | None:
        """The clicked step's record and tensors, or None when nothing is selected."""
        step = self.selected_step
        with self._lock:
            if not 0 <= step < len(self.records):
                return None
            record, text, result = self.records[step], self._rows[step]["t"], self.result
        return SelectedStep(step, record, text, _step_tensors(result, step) if result else {})

    def _consume(self, handle, flusher: _Flusher) -> None:
        """Worker of ``follow``: events -> rows, then the result (also a partial one)."""
        flusher.start()
        flusher.poke()
        try:
            for event in handle.events():
                if self._handle is not handle:  # follow() moved on to another generation
                    return
                self._push(event)
                flusher.poke()
        finally:
            if self._handle is handle:
                self._finish(_outcome(handle), handle.state)
            flusher.stop()

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
        return {"i": record.step, "t": text, "tok": record.token, "p": _finite(record.model_prob),
                "sc": {k: _finite(v) for k, v in record.scores.items()},
                "st": list(record.mixes_on), "mix": dict(record.live_coefs), "sd": record.steered,
                "rr": record.rerun,
                "ch": record.changed, "big": None, "small": None,
                "ut": _spell(self._big_tok, record.unsteered_token) if record.rerun else None}

    def _add_alternatives(self, result: GenerationResult) -> None:
        for name, topk, tok in (("big", result.big_topk, self._big_tok),
                                ("small", result.small_topk, self._small_tok)):
            if topk is None:
                continue
            for row, ids, logits in zip(self._rows, topk.ids.tolist(), topk.logits.tolist()):
                row[name] = [[_spell(tok, i), _finite(l)] for i, l in zip(ids, logits)]


class LiveView(ipywidgets.VBox):
    """What ``%%max_generate --live`` shows: the session's ``mixer`` above a TokenView
    (``view``) following ``handle``."""

    def __init__(self, session, handle):
        self.handle = handle
        self.mixer = session.mixer()
        self.view = TokenView(handle, session=session)
        super().__init__([self.mixer, self.view])

    def close(self) -> None:
        self.mixer.close()
        self.view.close()
        super().close()


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
    return tokenizer.decode([token]) if tokenizer is not None else f"<{token}>"


def _finite(x: float | None) -> float | None:
    """JSON has no NaN: a missing or non-finite number becomes null."""
    return float(x) if x is not None and math.isfinite(x) else None
