"""Streaming a generation into the cell output through display handles.

Two outputs: the text so far (one ``<span>`` per token, steered and re-run tokens marked
as in the result view) and a status line (steps, tokens/s, the live mix). Step events are
collected as they come and flushed at most ``max_hz`` times per second; a flush updates
only the outputs whose content changed since the last one.
"""
from __future__ import annotations

import html
import time
from collections.abc import Callable

from IPython.display import HTML, clear_output, display

from max_jupyter.jupyter.render import STYLE, mix_words
from max_jupyter.orchestrator.trace import StepEvent


class StreamDisplay:
    """The live view of one generation; call ``add`` per event (from the cell's thread),
    ``close`` at the end; a token is marked steered when its step added any delta."""

    def __init__(self, max_hz: float = 20.0, clock: Callable[[], float] = time.monotonic):
        self.min_interval = 1.0 / max_hz
        self.clock = clock
        self.spans: list[str] = []
        self.steps = 0
        self.mix: dict[str, float] = {}
        self.start = clock()
        self.last_flush = -float("inf")
        self.sent = {"text": "", "status": ""}
        self.updates = 0
        self.handles = {"text": display(HTML(""), display_id=True),
                        "status": display(HTML(""), display_id=True)}

    def add(self, event: StepEvent) -> None:
        """Take one step event; flush if the last flush is at least ``1 / max_hz`` s old."""
        record = event.record
        if record is not None:
            self.steps += 1
            self.mix = record.live_coefs
            marks = ("mj-steered " if record.steered else "") + ("mj-rerun" if record.rerun else "")
            if event.text:
                self.spans.append(f'<span class="mj-tok {marks}">{html.escape(event.text)}</span>')
        elif event.text:
            self.spans.append(html.escape(event.text))
        if self.clock() - self.last_flush >= self.min_interval:
            self.flush()

    def _status(self) -> str:
        elapsed = self.clock() - self.start
        rate = self.steps / elapsed if elapsed > 0 else 0.0
        mix = mix_words(self.mix) if self.mix else ""
        return f"step {self.steps} · {rate:.1f} tok/s" + (f" · mix: {mix}" if mix else "")

    def flush(self) -> None:
        """Send whatever changed since the last flush (nothing if nothing did)."""
        self.last_flush = self.clock()
        content = {"text": f'{STYLE}<div class="mj-text">{"".join(self.spans)}</div>',
                   "status": f'<div class="mj-summary">{html.escape(self._status())}</div>'}
        for key, value in content.items():
            if value != self.sent[key]:
                self.handles[key].update(HTML(value))
                self.sent[key] = value
                self.updates += 1

    def close(self) -> None:
        """End of the generation: the live outputs go away when the next output (the
        result) arrives."""
        clear_output(wait=True)
