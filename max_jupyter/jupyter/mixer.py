"""The live ``Mixer``: one row per steering vector, bound both ways to ``session.mix``.

Each row has an on/off box, a coefficient slider and a layer choice. A widget change
writes the mix (``set`` / ``set_coef`` / ``remove``: thread-safe, applied from the next
step of a running generation) and does nothing else; a change of the mix made anywhere
else (code, ``%max_steer``) reaches the rows through the mix's listener and moves them.
A header holds a Stop button for the running generation and its current step, read from
``session.handle`` by a small watcher thread (a few times a second, sending only changes).

Widget messages reach the kernel only while no cell runs, so a live generation is
started in the background (``session.start(...)``) and the cell returns at once.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterable

import ipywidgets as widgets

from max_jupyter.errors import ModelMismatchError
from max_jupyter.steering.mix import Mix, MixEntry
from max_jupyter.steering.vector import SteeringVector

ALL_LAYERS: tuple[int, ...] = ()
"""The layer choice that steers at every layer the vector has (a mix entry's ``layers=None``)."""


class MixerRow(widgets.HBox):
    """One vector: ``on`` (in the mix or not), ``coef`` (slider), ``layer`` (dropdown:
    all of the vector's layers or one). Widget changes write ``mix``; ``show`` moves the
    widgets to a mix entry without writing back. ``library``: where the vector comes from;
    switching the row on takes its current version there (it may have been retrained)."""

    def __init__(self, name: str, vector: SteeringVector, mix: Mix, *,
                 coef_range: tuple[float, float], step: float, library=None):
        self.name, self.vector, self.mix, self.library = name, vector, mix, library
        self._showing = False
        self.on = widgets.Checkbox(value=False, description=name, indent=False,
                                   layout=widgets.Layout(width="160px"))
        self.coef = widgets.FloatSlider(value=1.0, min=coef_range[0], max=coef_range[1], step=step,
                                        readout_format=".2f", continuous_update=True,
                                        description="coef", layout=widgets.Layout(width="360px"))
        self.layer = widgets.Dropdown(options=_layer_options(vector.layers), value=ALL_LAYERS,
                                      description="layer", layout=widgets.Layout(width="180px"))
        self.coef.add_class("max-mixer-coef")
        for w in (self.on, self.coef, self.layer):
            w.observe(self._write, names="value")
        super().__init__([self.on, self.coef, self.layer])
        self.add_class("max-mixer-row")
        self.add_class(f"max-mixer-row-{_css_name(name)}")
        try:
            vector.check_model(mix.model)
        except ModelMismatchError as e:
            self._disable(str(e))

    def _disable(self, why: str) -> None:
        for w in (self.on, self.coef, self.layer):
            w.disabled = True
        self.on.tooltip = why

    def _write(self, change: dict) -> None:
        """Widget -> mix: bring the mix's entry to what the row shows (only if it differs)."""
        if self._showing:
            return
        current = self.mix.entries.get(self.name)
        layers = self.layer.value or None
        try:
            if not self.on.value:
                if current is not None:
                    self.mix.remove(self.name)
            elif current is None and self.library is not None and self.name in self.library:
                self._use(self.library[self.name])
                self.mix.set(self.name, self.vector, self.coef.value, self.layer.value or None)
            elif current is None or current.layers != layers or current.vector is not self.vector:
                self.mix.set(self.name, self.vector, self.coef.value, layers)
            elif current.coef != self.coef.value:
                self.mix.set_coef(self.name, self.coef.value)
        except KeyError:  # removed by another thread meanwhile: the listener shows it
            pass

    def _use(self, vector: SteeringVector) -> None:
        """Take ``vector`` (a newer version of this row's) and offer its layers."""
        if vector is self.vector or vector.layers == self.vector.layers:
            self.vector = vector
            return
        self._showing = True
        try:
            self.vector = vector
            keep = self.layer.value if set(self.layer.value) <= set(vector.layers) else ALL_LAYERS
            self.layer.options = _layer_options(vector.layers)
            self.layer.value = keep if keep in [v for _, v in self.layer.options] else ALL_LAYERS
        finally:
            self._showing = False

    def show(self, entry: MixEntry | None) -> None:
        """Mix -> widgets: show ``entry`` (None: not in the mix; the slider keeps its value)."""
        self._showing = True
        try:
            if entry is not None:
                self.vector = entry.vector
                self._widen(entry.coef)
                self.coef.value = entry.coef
                layers = entry.layers or ALL_LAYERS
                if layers not in [value for _, value in self.layer.options]:
                    self.layer.options = [*self.layer.options, (",".join(map(str, layers)), layers)]
                self.layer.value = layers
            self.on.value = entry is not None
        finally:
            self._showing = False

    def _widen(self, coef: float) -> None:
        """Extend the slider's range to hold ``coef`` (a slider clamps what it cannot show)."""
        if coef < self.coef.min:
            self.coef.min = math.floor(coef)
        if coef > self.coef.max:
            self.coef.max = math.ceil(coef)


class Mixer(widgets.VBox):
    """The live mix of ``session`` as widgets: a row per vector in ``session.vectors`` (and
    per mix entry not in the library), a Stop button and the running generation's step.

    ``coef_range`` / ``step``: the sliders' range and step (a coefficient set in code
    outside the range widens it). ``poll_s``: how often the watcher reads the handle.
    ``close()`` detaches the listener and ends the watcher.
    """

    def __init__(self, session, *, coef_range: tuple[float, float] = (-2.0, 2.0),
                 step: float = 0.05, poll_s: float = 0.2):
        self.session = session
        self.rows: dict[str, MixerRow] = {}
        self._coef_range, self._step = coef_range, step
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger",
                                          disabled=True, layout=widgets.Layout(width="90px"))
        self.stop_button.add_class("max-mixer-stop")
        self.stop_button.on_click(self._stop)
        self.status = widgets.HTML("no generation")
        self.status.add_class("max-mixer-status")
        self._rows_box = widgets.VBox()
        self._refreshing = threading.RLock()
        self._library_size = 0
        super().__init__([widgets.HBox([self.stop_button, self.status]), self._rows_box])
        self.add_class("max-mixer")
        self.refresh()
        session.mix.add_listener(self._on_mix)
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(poll_s,), daemon=True,
                                         name="max-mixer-watch")
        self._watcher.start()

    def refresh(self) -> None:
        """Add rows for vectors new to the library or the mix, and show the mix on all rows."""
        with self._refreshing:
            entries, library = self.session.mix.entries, list(self.session.vectors)
            self._library_size = len(library)
            names = [*library, *(n for n in entries if n not in library)]
            new = [n for n in dict.fromkeys(names) if n not in self.rows]
            for name in new:
                vector = entries[name].vector if name in entries else self.session.vectors[name]
                self.rows[name] = MixerRow(name, vector, self.session.mix,
                                           coef_range=self._coef_range, step=self._step,
                                           library=self.session.vectors)
            if new:
                self._rows_box.children = list(self.rows.values())
            for name, row in self.rows.items():
                row.show(entries.get(name))

    def _on_mix(self, mix: Mix) -> None:
        """The mix changed (on the thread that changed it): move the rows."""
        entries = mix.entries
        if any(name not in self.rows for name in entries):
            self.refresh()
            return
        for name, row in self.rows.items():
            row.show(entries.get(name))

    def _stop(self, _button: widgets.Button) -> None:
        handle = self.session.handle
        if handle is not None:
            handle.stop()

    def _watch(self, poll_s: float) -> None:
        """Every ``poll_s``: add rows for vectors new to the library; show the running
        generation's step and state. Ends with ``close()`` or the session."""
        shown = None
        while not self._closed.wait(poll_s) and not self.session.closed:
            if len(self.session.vectors) != self._library_size:
                self.refresh()
            shown = self._show_handle(shown)

    def _show_handle(self, shown: tuple | None) -> tuple | None:
        """Show ``session.handle`` if it changed from ``shown``; enable Stop while it runs."""
        handle = self.session.handle
        now = (id(handle), handle.state, handle.step) if handle is not None else None
        if now != shown:
            running = handle is not None and handle.state in ("queued", "running")
            self.stop_button.disabled = not running
            self.status.value = (f"step <b>{handle.step}</b> · {handle.state}"
                                 if handle is not None else "no generation")
        return now

    def close(self) -> None:
        """Stop following the session and close the widgets."""
        self._closed.set()
        try:
            self.session.mix.remove_listener(self._on_mix)
        except ValueError:
            pass
        for row in self.rows.values():
            row.close()
        super().close()


def _layer_options(layers: Iterable[int]) -> list[tuple[str, tuple[int, ...]]]:
    return [("all", ALL_LAYERS), *((str(l), (l,)) for l in layers)]


def _css_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
