"""The notebook layer: magics, result display, plots (IPython, matplotlib).

``%load_ext max_jupyter`` calls ``load_ipython_extension``; nothing here is imported by
``import max_jupyter``.
"""
from __future__ import annotations

from max_jupyter import load_ipython_extension, unload_ipython_extension
from max_jupyter.jupyter.lens import LogitLens, logit_lens
from max_jupyter.jupyter.plots import (divergence, plot_divergence, plot_judges, plot_logit_lens,
                                       plot_projection, plot_sweep)
from max_jupyter.jupyter.render import result_html, summary
from max_jupyter.jupyter.sweep import Sweep, run_sweep

__all__ = ["LogitLens", "Sweep", "divergence", "load_ipython_extension", "logit_lens",
           "plot_divergence", "plot_judges", "plot_logit_lens", "plot_projection", "plot_sweep",
           "result_html", "run_sweep", "summary", "unload_ipython_extension"]
