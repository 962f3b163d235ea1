"""Registering and unregistering the extension in an IPython shell."""
from __future__ import annotations

import logging

from traitlets import TraitError
from traitlets.config import Config

from max_jupyter.jupyter.magics import MaxMagics
from max_jupyter.jupyter.render import pretty, result_html
from max_jupyter.orchestrator.trace import GenerationResult

_LOADED: dict[int, MaxMagics] = {}  # id(shell) -> its magics


def load(shell) -> MaxMagics:
    """See ``max_jupyter.load_ipython_extension``. Loading twice is a no-op."""
    if id(shell) in _LOADED:
        return _LOADED[id(shell)]
    magics = MaxMagics(shell=shell, config=Config())  # joins shell.configurables (%config)
    apply_config(magics, shell.config.get("MaxMagics", {}))
    session = shell.user_ns.get("max_session")
    if session is not None and hasattr(session, "closed") and not session.closed:
        magics.session = session
    shell.register_magics(magics)
    formatters = shell.display_formatter.formatters
    formatters["text/html"].for_type(GenerationResult, lambda r: _html(magics, r))
    formatters["text/plain"].for_type(GenerationResult, pretty)
    _LOADED[id(shell)] = magics
    return magics


def _html(magics: MaxMagics, result: GenerationResult) -> str:
    """The result's HTML with the session's tokenizers, if its tokens can be theirs."""
    big, small = magics.tokenizers()
    if big is not None and max(result.token_ids, default=0) >= big.vocab_size:
        big = small = None  # made by another model: show the text whole
    return result_html(result, big, small)


def apply_config(magics: MaxMagics, section) -> None:
    """Set the ``%config MaxMagics.*`` values given before loading; a value its trait
    refuses (``%config`` keeps refused values in the shell's config) is skipped with a
    one-line error instead of failing the load."""
    for name, value in section.items():
        try:
            setattr(magics, name, value)
        except TraitError as e:
            logging.error("ignored MaxMagics.%s: %s", name, str(e).splitlines()[0])


def unload(shell) -> None:
    """See ``max_jupyter.unload_ipython_extension``."""
    magics = _LOADED.pop(id(shell), None)
    if magics is None:
        return
    magics.stop_server()
    manager = shell.magics_manager
    for kind, names in magics.magics.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    manager.registry.pop(type(magics).__name__, None)
    shell.configurables[:] = [c for c in shell.configurables if c is not magics]
    for mime in ("text/html", "text/plain"):
        shell.display_formatter.formatters[mime].pop(GenerationResult, None)
