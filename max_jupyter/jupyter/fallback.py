"""A live widget's static copy in the notebook, for when the widget cannot be shown.

A widget's output holds only a reference to a model in the kernel: after a kernel restart,
or in a notebook opened elsewhere (GitHub, nbviewer), JupyterLab shows "Error displaying
widget: model not found" and the text is gone. So a widget of this package, displayed,
shows two outputs: the widget itself, then an HTML output (``StaticFallback``) that the
widget keeps current (for a TokenView: the final text with its token colouring and the live
mix per step). The saved notebook carries that HTML. While the widget is shown live, a CSS
rule inside the HTML hides it (the output right after one holding a ``.max-tokenview`` or
``.max-mixer``); where the widget is missing, or styles are stripped, it shows, and in
JupyterLab it stands in for the widget's "model not found" line.
"""
from __future__ import annotations

import threading

from IPython.display import HTML, display

FALLBACK_STYLE = ("<style>.jp-OutputArea-child:has(.max-tokenview, .max-mixer) + "
                  ".jp-OutputArea-child .mj-fallback{display:none}"
                  ".jp-OutputArea-child:has(+ .jp-OutputArea-child .mj-fallback) > "
                  ".jp-OutputArea-output.jupyter-widgets:not(:has(*)){display:none}</style>")
"""Hides the copy under a live widget; where the widget is missing, hides JupyterLab's
one-line "Error displaying widget" (an output with text only) above the copy instead."""


class StaticFallback:
    """The HTML copy of one widget: ``show()`` adds an output holding it (once per display
    of the widget), ``update(html)`` rewrites every such output (from any thread)."""

    def __init__(self, html: str):
        self._html = html
        self._handles: list = []
        self._lock = threading.Lock()

    @property
    def html(self) -> str:
        return self._html

    def show(self) -> None:
        """Display the copy under the widget just displayed."""
        handle = display(HTML(self._wrapped(self._html)), display_id=True)
        with self._lock:
            self._handles.append(handle)

    def update(self, html: str) -> None:
        """Show ``html`` in every output of this copy (nothing is sent if it is unchanged)."""
        with self._lock:
            if html == self._html:
                return
            self._html = html
            handles = list(self._handles)
        for handle in handles:
            handle.update(HTML(self._wrapped(html)))

    @staticmethod
    def _wrapped(html: str) -> str:
        return f'{FALLBACK_STYLE}<div class="mj-fallback">{html}</div>'


class ShownWithFallback:
    """Mixin for a widget with a ``fallback`` (``StaticFallback``): displayed, it shows its
    widget view, then the fallback."""

    fallback: StaticFallback

    def _ipython_display_(self, **kwargs) -> None:
        repr_bundle = getattr(self, "_repr_mimebundle_", None)  # None once closed
        bundle = repr_bundle(**kwargs) if repr_bundle is not None else None
        if bundle is None:  # a closed widget: only its copy is left
            display(HTML(self.fallback.html))
            return
        data = dict(bundle[0] if isinstance(bundle, tuple) else bundle)
        data["text/plain"] = f"{type(self).__name__} (a live widget; a static copy follows)"
        display(data, raw=True)
        self.fallback.show()
