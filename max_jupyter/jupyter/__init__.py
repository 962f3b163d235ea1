"""The notebook layer: magics, result display, plots (IPython, matplotlib), the live
widgets (``Mixer``, ``TokenView``, ``LiveView``: ipywidgets, anywidget; imported on first use).

``%load_ext max_jupyter`` calls ``load_ipython_extension``; nothing here is imported by
``import max_jupyter``.
"""
from __future__ import annotations

from max_jupyter.jupyter.lens import LogitLens, logit_lens
from max_jupyter.jupyter.plots import (
    divergence,
    plot_divergence,
    plot_evaluation,
    plot_judges,
    plot_logit_lens,
    plot_projection,
    plot_sweep,
)
from max_jupyter.jupyter.render import result_html, summary
from max_jupyter.jupyter.sweep import Sweep, run_sweep

_WIDGETS = {"Mixer": "max_jupyter.jupyter.mixer", "TokenView": "max_jupyter.jupyter.tokenview",
            "LiveView": "max_jupyter.jupyter.tokenview"}

__all__ = [*_WIDGETS, "LogitLens", "Sweep", "divergence", "load_ipython_extension", "logit_lens",
           "plot_divergence", "plot_evaluation", "plot_judges", "plot_logit_lens", "plot_projection", "plot_sweep",
           "result_html", "run_sweep", "summary", "unload_ipython_extension"]


def __getattr__(name: str):
    if name in _WIDGETS:
        import importlib

        return getattr(importlib.import_module(_WIDGETS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_ipython_extension(shell) -> None:
    """``%load_ext max_jupyter.jupyter``: as ``%load_ext max_jupyter`` (IPython is imported
    only now, so the lens and plots work where it is absent)."""
    from max_jupyter.jupyter.extension import load

    load(shell)


def unload_ipython_extension(shell) -> None:
    """Undo ``load_ipython_extension``."""
    from max_jupyter.jupyter.extension import unload

    unload(shell)
