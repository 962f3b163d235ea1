"""Stop strings over streamed text: hold back what might begin a stop string."""
from __future__ import annotations

from collections.abc import Sequence

from max_jupyter.tokenizer import StreamDecoder
from max_jupyter.validation import check_stop


class StopStrings:
    """Feed text pieces; get back the text safe to show and whether a stop string ended it."""

    def __init__(self, stops: Sequence[str] = ()):
        """``stops``: a list or tuple of non-empty str, or None (checked: ``BadArgumentError``)."""
        self.stops = check_stop(stops)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text from ``held + piece`` that can be shown now; sets ``stopped`` at a stop string."""
        text = self._held + piece
        if not self.stops:
            return text
        cut = min((i for s in self.stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._held, self.stopped = "", True
            return text[:cut]
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Held-back text at the end of a generation that did not stop on a string."""
        text, self._held = self._held, ""
        return text

    def drain(self, decoder: StreamDecoder) -> str:
        """At the end of a generation: the decoder's remainder plus held-back text, or
        ``""`` if a stop string ended it."""
        if self.stopped:
            return ""
        return self.feed(decoder.flush()) + self.flush()
