"""``MaxMagics``: the IPython magics of MAX Engine (``%load_ext max_jupyter``), one module
per magic and this router.

Every magic talks to one ``Session`` (``%max_load`` makes it; it is also ``max_session`` in
the namespace). Options are parsed with IPython's ``magic_arguments`` (so ``%max_load?``
lists them); defaults are ``%config MaxMagics.<trait>`` traits, ``None`` meaning the
Session's own default. Errors a user can fix (``MaxJupyterError`` from the layers below,
a bad option) show as one-line ``UsageError``s; anything else keeps its traceback.

``MaxMagics`` holds the traits and the state (the session, the server) and routes: each
magic is one function of its module (``load``, ``generate``, ``steer``, ``judge``,
``sweep``, ``serve``, ``evaluate``), taking the magics first; the sub-commands of ``%max_steer`` and
``%max_judge`` are listed in ``SUBCOMMANDS``.
"""
from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class, no_var_expand
from IPython.utils.text import DollarFormatter
from traitlets import Bool, Float, Integer, TraitError, Unicode, validate
from traitlets.config import Configurable

from max_jupyter.errors import MaxJupyterError, did_you_mean
from max_jupyter.jupyter.magics import evaluate, generate, judge, load, serve, steer, sweep
from max_jupyter.jupyter.magics.arguments import usage_errors
from max_jupyter.jupyter.steerspec import parse_layers
from max_jupyter.orchestrator.speculative import MAX_SPECULATE

SUBCOMMANDS = {
    "steer": {"list": steer.list_vectors, "concepts": steer.concepts, "show": steer.show, "train": steer.train,
              "on": steer.on, "off": steer.off, "set": steer.set_, "mix": steer.mix, "mixer": steer.mixer,
              "save": steer.save, "load": steer.load, "rm": steer.rm,
              "import": steer.import_, "export": steer.export, "search": steer.search},
    "judge": {"probe": judge.probe, "divergence": judge.divergence, "off": judge.off,
              "list": judge.list_judges},
}
"""``%max_<group> <command>``: group -> command -> function(magics, args)."""


@magics_class
class MaxMagics(Magics, Configurable):
    """Magics of MAX Engine; configure defaults with ``%config MaxMagics.<name> = value``."""

    max_new_tokens = Integer(None, allow_none=True, min=1,
                             help="Tokens to generate (None: the session's default).").tag(config=True)
    temperature = Float(None, allow_none=True, min=0.0,
                        help="Sampling temperature; 0 is greedy (None: the session's default).").tag(config=True)
    top_p = Float(None, allow_none=True, help="Nucleus sampling mass in (0, 1].").tag(config=True)
    top_k = Integer(None, allow_none=True, min=0, help="Sample among the k best tokens (0: all).").tag(config=True)
    seed = Integer(None, allow_none=True, min=0, help="Sampling seed (None: fresh randomness).").tag(config=True)
    system = Unicode(None, allow_none=True, help="System message for the chat template.").tag(config=True)
    capture = Unicode("", help="Big-model layers to capture per step, e.g. '12-15'.").tag(config=True)
    stream = Bool(True, help="Stream %%max_generate's text into the cell output.").tag(config=True)
    update_hz = Float(20.0, help="Most display updates per second while streaming (0 < hz <= 20).").tag(config=True)
    speculate = Integer(0, help=f"Longest draft of speculative decoding, up to {MAX_SPECULATE} "
                                f"(0: the session's default, off unless set there; needs a small "
                                f"model with the big one's vocabulary).").tag(config=True)

    # The magics: one function each, from its module (the name is the magic's name).
    max_load = line_magic(load.max_load)
    max_generate = cell_magic(generate.max_generate)
    max_steer = no_var_expand(line_magic(steer.max_steer))
    max_judge = line_magic(judge.max_judge)
    max_sweep = line_cell_magic(sweep.max_sweep)
    max_serve = line_magic(serve.max_serve)
    max_eval = line_magic(evaluate.max_eval)

    @validate("top_p")
    def _check_top_p(self, proposal):
        value = proposal["value"]
        if value is not None and not 0.0 < value <= 1.0:
            raise TraitError(f"MaxMagics.top_p={value!r} is out of range; use a number in (0, 1].")
        return value

    @validate("update_hz")
    def _check_update_hz(self, proposal):
        value = proposal["value"]
        if not 0.0 < value <= 20.0:
            raise TraitError(f"MaxMagics.update_hz={value!r} is out of range; use 0 < hz <= 20.")
        return value

    @validate("speculate")
    def _check_speculate(self, proposal):
        value = proposal["value"]
        if isinstance(value, bool) or not 0 <= value <= MAX_SPECULATE:
            raise TraitError(f"MaxMagics.speculate={value!r} is out of range; use 0 (off) up to "
                             f"{MAX_SPECULATE} draft tokens.")
        return value

    @validate("capture")
    def _check_capture(self, proposal):
        value = proposal["value"]
        if value:
            try:
                parse_layers(value, "MaxMagics.capture")
            except MaxJupyterError as e:
                raise TraitError(str(e)) from None
        return value

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.session = None
        self.server = None

    def route(self, group: str, args):
        """Run ``SUBCOMMANDS[group][args.command](self, args)`` with fixable errors as
        ``UsageError``."""
        table = SUBCOMMANDS[group]
        command = table.get(args.command)
        if command is None:
            raise UsageError(f"unknown %max_{group} command {args.command!r}"
                             f"{did_you_mean(args.command, table)}; use one of "
                             f"{', '.join(sorted(table))}.")
        args.group = group
        with usage_errors():
            return command(self, args)

    def need_session(self):
        """The loaded, open session, or a ``UsageError`` saying to load one."""
        if self.session is None or self.session.closed:
            raise UsageError("no models loaded; run %max_load first (no arguments: the embedded model).")
        return self.session

    def expand(self, text: str) -> str:
        """IPython's ``$name`` / ``{expr}`` expansion of ``text`` in the user namespace."""
        try:
            return DollarFormatter().vformat(text, args=[], kwargs=self.shell.user_ns)
        except Exception:  # IPython leaves what it cannot expand as written
            return text

    def close_session(self) -> None:
        """Close the magics' session (and its server) if there is one."""
        if self.session is not None:
            self.stop_server()
            self.session.close()
            self.session = None

    def stop_server(self) -> None:
        """Stop ``%max_serve``'s server if it runs (the session stays open)."""
        serve.stop_server(self)

    def tokenizers(self):
        """(big, small) tokenizers of the open session for rendering results, or Nones."""
        s = self.session
        if s is None or s.closed:
            return None, None
        return s.big.tokenizer, (s.small.tokenizer if s.small is not None else None)
