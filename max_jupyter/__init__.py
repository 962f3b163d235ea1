"""MAX Engine: steer a big model from its residual stream while a small one watches.

``from max_jupyter import Session`` is the entry point (see docs/design.md); it and its
parts are imported on first use, so ``import max_jupyter`` stays light.
"""

_LAZY = {"Session": "max_jupyter.session", "GenerationOptions": "max_jupyter.orchestrator.options",
         "GenerationHandle": "max_jupyter.handle", "SessionPool": "max_jupyter.pool"}
__all__ = [*_LAZY, "load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_ipython_extension(shell) -> None:
    """``%load_ext max_jupyter``: the magics and result display (imported only now)."""
    from max_jupyter.jupyter.extension import load

    load(shell)


def unload_ipython_extension(shell) -> None:
    """``%unload_ext max_jupyter``: undo ``load_ipython_extension``."""
    from max_jupyter.jupyter.extension import unload

    unload(shell)
