"""The live ``Mixer``: one row per steering vector, bound both ways to ``session.mix``.

Each row has an on/off box, a coefficient slider and a layer choice. A widget change
writes the mix (``set`` / ``set_coef`` / ``remove``: thread-safe, applied from the next
step of a running generation) and does nothing else; a change of the mix made anywhere
else (code, ``%max_steer``) reaches the rows through the mix's listener and moves them.
A text field beside the rows takes a steering expression (docs/steering.md): pressing Enter
makes it the live mix (``Session.steer``: ablations, phases and gates included; blank: an
empty mix), and the rows move to it; a bad expression changes nothing and its error (with the column) shows
beside the field. A header holds a Stop button and the step of the Mixer's own generation (``handle``, or
``follow(handle)``; none for a Mixer made alone), read from the handle's event pump. A small
watcher thread adds rows for vectors new to the library and, once the session is closed
(``%max_load`` again), disables the Mixer and says so.

Widget messages reach the kernel only while no cell runs, so a live generation is
started in the background (``session.start(...)``) and the cell returns at once.
"""
from __future__ import annotations

import html
import math
import threading
import time
from collections.abc import Callable, Iterable

import ipywidgets as widgets

from max_jupyter.errors import MaxJupyterError, ModelMismatchError
from max_jupyter.jupyter.fallback import ShownWithFallback, StaticFallback
from max_jupyter.steering.mix import Mix, MixEntry
from max_jupyter.steering.vector import SteeringVector

ALL_LAYERS: tuple[int, ...] = ()
"""The layer choice that steers at every layer the vector has (a mix entry's ``layers=None``)."""
START_COEF = 0.25
"""A row's coefficient before its slider is moved: a visible but safe push on the models
measured in docs/vectors.md (text garbles from about 1)."""


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
        self.coef = widgets.FloatSlider(value=START_COEF, min=coef_range[0], max=coef_range[1], step=step,
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
        """Widget -> mix: bring the mix's entry to what the row shows (only if it differs;
        not at all once the row is disabled)."""
        if self._showing or self.on.disabled:
            return
        current = self.mix.entries.get(self.name)
        layers = self.layer.value or None
        try:
            if not self.on.value:
                if current is not None:
                    self.mix.remove(self.name)
            elif current is None and self.library is not None and self.name in self.library:
                self._use(self.library[self.name])
                self.mix.set(self.name, self.vector, self.slider_coef, self.layer.value or None)
            elif current is None or current.layers != layers or current.vector is not self.vector:
                self.mix.set(self.name, self.vector, self.slider_coef, layers)
            elif current.coef != self.slider_coef:
                self.mix.set_coef(self.name, self.slider_coef)
        except KeyError:  # removed by another thread meanwhile: the listener shows it
            pass

    @property
    def slider_coef(self) -> float:
        """The slider's value rounded to 6 decimals: the browser computes it as ``min + n *
        step``, which gives float noise (``-0.050000000000000044``) that would otherwise be
        recorded in every step's ``live_coefs``."""
        return round(self.coef.value, 6)

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
                if round(self.coef.value, 6) != entry.coef:  # the slider's own move, rounded, is
                    self.coef.value = entry.coef  # not sent back: it would undo keys pressed meanwhile
                layers = entry.layers or ALL_LAYERS
                if layers not in [value for _, value in self.layer.options]:
                    self.layer.options = [*self.layer.options, (",".join(map(str, layers)), layers)]
                self.layer.value = layers
            self.on.value = entry is not None
            # an ablation or clamp (from an expression) has no coefficient or layer to slide
            fixed = entry is not None and entry.op != "add"
            self.coef.disabled = self.layer.disabled = fixed or self.on.disabled
        finally:
            self._showing = False

    def _widen(self, coef: float) -> None:
        """Extend the slider's range to hold ``coef`` (a slider clamps what it cannot show)."""
        if coef < self.coef.min:
            self.coef.min = math.floor(coef)
        if coef > self.coef.max:
            self.coef.max = math.ceil(coef)


class Mixer(ShownWithFallback, widgets.VBox):
    """The live mix of ``session`` as widgets: a row per vector in ``session.vectors`` (and
    per mix entry not in the library), a Stop button and the step of ``handle`` (the
    Mixer's own generation; ``follow`` binds another, None: no generation).

    ``coef_range`` / ``step``: the sliders' range and step (a coefficient set in code
    outside the range widens it). ``poll_s``: how often the watcher looks at the library
    and the session, and the most often the step is shown. ``close()`` detaches the
    listeners and ends the watcher. Displayed, the Mixer is followed by its static copy
    (``fallback``: the live mix and the generation's state).
    """

    def __init__(self, session, handle=None, *, coef_range: tuple[float, float] = (-2.0, 2.0),
                 step: float = 0.05, poll_s: float = 0.2):
        self.session = session
        self.handle = None
        self.rows: dict[str, MixerRow] = {}
        self._coef_range, self._step, self._poll_s = coef_range, step, poll_s
        self._listener = None
        self._shown_at = -float("inf")
        self._closed_callbacks: list[Callable[[], None]] = []
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger",
                                          disabled=True, layout=widgets.Layout(width="90px"))
        self.stop_button.add_class("max-mixer-stop")
        self.stop_button.on_click(self._stop)
        self.status = widgets.HTML("no generation")
        self.status.add_class("max-mixer-status")
        self.expression = widgets.Text(value="", placeholder="0.3 joy - 0.2 verbose @response; !refusal",
                                       description="steer", continuous_update=False,
                                       layout=widgets.Layout(width="480px"))
        self.expression.add_class("max-mixer-expression")
        self.expression.observe(self._steer, names="value")
        self.expression_error = widgets.HTML("")
        self.expression_error.add_class("max-mixer-expression-error")
        self._rows_box = widgets.VBox()
        self._refreshing = threading.RLock()
        self._library_size = 0
        super().__init__([widgets.HBox([self.stop_button, self.status]),
                          widgets.HBox([self.expression, self.expression_error]), self._rows_box])
        self.add_class("max-mixer")
        self.refresh()
        session.mix.add_listener(self._on_mix)
        self._closed = threading.Event()
        if handle is not None:
            self.follow(handle)
        self.fallback = StaticFallback(self.static_html())
        self._watcher = threading.Thread(target=self._watch, args=(poll_s,), daemon=True,
                                         name="max-mixer-watch")
        self._watcher.start()

    def follow(self, handle) -> None:
        """Show ``handle``'s step and state, and let Stop stop it (and no other)."""
        if self._listener is not None:
            self.handle.unsubscribe(self._listener)
        self.handle, self._shown_at = handle, -float("inf")
        self._show_handle(handle)
        self._listener = handle.subscribe(lambda _event: self._on_step(handle),
                                          lambda ended: self._show_handle(ended))

    def on_session_closed(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the watcher thread) once the session is seen closed."""
        self._closed_callbacks.append(callback)

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

    def _steer(self, change: dict) -> None:
        """The text field's expression -> the live mix (its error shown, nothing changed)."""
        try:
            self.session.steer(change["new"], "the Mixer's expression")  # blank: an empty mix
        except MaxJupyterError as e:
            self.expression_error.value = f'<span style="color:#b00">{html.escape(str(e))}</span>'
            return
        self.expression_error.value = ""

    def _stop(self, _button: widgets.Button) -> None:
        if self.handle is not None:
            self.handle.stop()

    def _on_step(self, handle) -> None:
        """A step of the followed generation: show it, at most once per ``poll_s``."""
        if time.monotonic() - self._shown_at >= self._poll_s:
            self._show_handle(handle)

    def _show_handle(self, handle) -> None:
        """Show ``handle``'s step and state; enable Stop while it runs (not once the Mixer
        or its session is closed: what they show stays)."""
        if handle is not self.handle or self._closed.is_set() or self.session.closed:
            return
        self._shown_at = time.monotonic()
        self.stop_button.disabled = handle.state not in ("queued", "running")
        self.status.value = f"step <b>{handle.step}</b> · {handle.state}"

    def _watch(self, poll_s: float) -> None:
        """Every ``poll_s``: add rows for vectors new to the library, keep the static copy
        current; once the session is closed, disable the Mixer. Ends with ``close()``."""
        while not self._closed.wait(poll_s):
            if self.session.closed:
                self._session_closed()
                return
            if len(self.session.vectors) != self._library_size:
                self.refresh()
            self.fallback.update(self.static_html())

    def _session_closed(self) -> None:
        """Disable every control and say why; tell ``on_session_closed``'s callbacks."""
        for row in self.rows.values():
            row._disable("the session of this Mixer is closed")
        self.stop_button.disabled = True
        self.status.value = ("<b>session closed</b>: this Mixer no longer steers anything; "
                             "make a new one for the new session (%max_steer mixer)")
        try:
            self.session.mix.remove_listener(self._on_mix)
        except ValueError:
            pass
        self.fallback.update(self.static_html())
        for callback in self._closed_callbacks:
            callback()

    def static_html(self) -> str:
        """The static copy: the live mix's entries and the generation's state."""
        entries = self.session.mix.entries
        mix = "; ".join(f"{name} {e.coef:+.2f}" + (f" @{','.join(map(str, e.layers))}" if e.layers else "")
                        for name, e in entries.items()) or "empty"
        state = (f"step {self.handle.step} · {self.handle.state}" if self.handle is not None
                 else "no generation")
        closed = " · session closed" if self.session.closed else ""
        return (f'<div class="mj-summary">Mixer · live mix: {html.escape(mix)} · '
                f'{html.escape(state)}{closed}</div>')

    def close(self) -> None:
        """Stop following the session and the generation and close the widgets."""
        self._closed.set()
        if self._listener is not None:
            self.handle.unsubscribe(self._listener)
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
