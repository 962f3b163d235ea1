"""``MaxMagics``: the IPython magics of MAX Engine (``%load_ext max_jupyter``).

Every magic talks to one ``Session`` (``%max_load`` makes it; it is also ``max_session`` in
the namespace). Options are parsed with IPython's ``magic_arguments`` (so ``%max_load?``
lists them); defaults are ``%config MaxMagics.<trait>`` traits, ``None`` meaning the
Session's own default. Errors a user can fix (``MaxJupyterError`` from the layers below,
a bad option) show as one-line ``UsageError``s; anything else keeps its traceback.

Subcommands of ``%max_steer`` / ``%max_judge`` are methods named ``_steer_<name>`` /
``_judge_<name>``: a subclass or a later module adds one by adding a method.
"""
from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path

from IPython.core.error import UsageError
from IPython.core.magic import (Magics, line_cell_magic, line_magic, cell_magic, magics_class,
                                no_var_expand)
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.utils.text import DollarFormatter
from traitlets import Bool, Float, Integer, TraitError, Unicode, validate
from traitlets.config import Configurable

from max_jupyter.errors import MaxJupyterError
from max_jupyter.jupyter.steerspec import SteerTerm, lookup_vector, parse_layers, parse_spec, spec_mix
from max_jupyter.orchestrator.speculative import MAX_SPECULATE

GLUED = ("--steer", "--coefs", "--threshold", "--system", "--prompt")
"""Options whose value may start with ``-`` (``--coefs -2:2:1``): glued to their value
before argparse sees them, so it does not take the value for an option."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn the errors a user can fix into a one-line ``UsageError`` (no traceback)."""
    try:
        yield
    except MaxJupyterError as e:
        raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def split_line(line: str) -> list[str]:
    """Shell-like tokens of a magic line (quotes removed, a ``# comment`` dropped), option
    values glued (``GLUED``)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as e:
        raise UsageError(f"cannot split the line: {e} (check the quotes).") from None
    out: list[str] = []
    it = iter(tokens)
    for token in it:
        if token in GLUED:
            value = next(it, None)
            out.append(token if value is None else f"{token}={value}")
        else:
            out.append(token)
    return out


def parse(magic, line: str):
    """Parse ``line`` with ``magic``'s ``magic_arguments`` parser (errors: ``UsageError``)."""
    return magic.parser.parse_args(split_line(line))


def layers_arg(text: str | None, num_layers: int, what: str) -> tuple[int, ...] | None:
    """``--layers`` text as a tuple of layers in ``0..num_layers-1`` (None stays None)."""
    if text is None:
        return None
    layers = parse_layers(text, what)
    bad = [l for l in layers if l >= num_layers]
    if bad:
        raise UsageError(f"{what} {text!r}: layer(s) {bad} out of range; the model has layers "
                         f"0..{num_layers - 1}.")
    return layers


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
        self._new_mix = None  # a mix %max_judge --steer just made, dropped if the judge is refused

    # ---------------------------------------------------------------- helpers

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

    def examples(self, value: str, what: str) -> list[str]:
        """``--pos`` / ``--neg``: ``$name`` of a list of strings, or a file with one per line."""
        if value.startswith("$"):
            name = value[1:]
            if name not in self.shell.user_ns:
                raise UsageError(f"{what} {value}: no variable {name!r} in the namespace.")
            items = self.shell.user_ns[name]
            if isinstance(items, str) or not all(isinstance(x, str) for x in items):
                raise UsageError(f"{what} {value}: {name!r} must be a list of strings.")
            return list(items)
        path = Path(self.expand(value)).expanduser()
        if not path.is_file():
            raise UsageError(f"{what} {value!r}: neither $variable (a list of strings) nor a file "
                             f"with one example per line.")
        return [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]

    def close_session(self) -> None:
        """Close the magics' session (and its server) if there is one."""
        if self.session is not None:
            self.stop_server()
            self.session.close()
            self.session = None

    def tokenizers(self):
        """(big, small) tokenizers of the open session for rendering results, or Nones."""
        s = self.session
        if s is None or s.closed:
            return None, None
        return s.big.tokenizer, (s.small.tokenizer if s.small is not None else None)

    # ---------------------------------------------------------------- %max_load

    @magic_arguments()
    @argument("big", nargs="?", default=None,
              help="Big model: a local HF folder, a .gguf file or a fetched name such as "
                   "qwen2.5-coder-1.5b (make real-pair) (default: the embedded SmolLM2).")
    @argument("--small", default=None, help="Small model: a folder, a .gguf, a fetched name such as "
                                            "qwen2.5-coder-0.5b, or 'same' (the big one again).")
    @argument("--backend", default="auto", help="auto, transformers or exllamav2.")
    @argument("--vram", type=float, default=None, metavar="GB", help="GPU memory budget in GB.")
    @argument("--cache-tokens", type=int, default=None, metavar="N", help="KV cache length in tokens.")
    @argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if present).")
    @argument("--store", default="default",
              help="Vector library: 'default' (kept across kernels), ':memory:' (a throwaway "
                   "library), 'none' (a plain dict), or a path to a SQLite file.")
    @argument("--session", default=None, metavar="VAR",
              help="Use the Session already in variable VAR instead of loading one.")
    @line_magic
    def max_load(self, line: str = ""):
        """Load the models into a Session (closing the previous one) and print its layout."""
        from max_jupyter.session import Session

        args = parse(self.max_load, line)
        if args.session is not None:
            session = self.shell.user_ns.get(args.session)
            if not isinstance(session, Session) or session.closed:
                raise UsageError(f"--session {args.session}: no open Session in that variable.")
        else:
            from max_jupyter.loading import check_sources

            with usage_errors():  # a mistyped source must not cost the session that works
                check_sources(args.big, args.small, args.backend)
            self.close_session()  # first: the memory goes back before the new models load
            store = None if args.store == "none" else args.store
            with usage_errors():
                session = Session.load(args.big, args.small, backend=args.backend,
                                       max_vram_gb=args.vram, cache_tokens=args.cache_tokens,
                                       device=args.device, store=store)
        if self.session is not session:
            self.close_session()
        self.session = session
        self.shell.user_ns["max_session"] = session
        print(f"big:   {session.big.identity.describe()}")
        if session.small is not None:
            print(f"small: {session.small.identity.describe()}")
        if session.plan is not None:
            print(session.plan)

    # ---------------------------------------------------------------- %%max_generate

    def generation_options(self, args, session) -> dict:
        """Session.generate keywords from parsed options and the %config defaults
        (``speculate`` only when ``--speculate`` is given or the trait is not 0: otherwise
        the session's default stands)."""
        from max_jupyter.orchestrator.trace import TraceConfig

        opts = {"max_new_tokens": args.n if args.n is not None else self.max_new_tokens,
                "temperature": args.temperature if args.temperature is not None else self.temperature,
                "top_p": args.top_p if args.top_p is not None else self.top_p,
                "top_k": args.top_k if args.top_k is not None else self.top_k,
                "seed": args.seed if args.seed is not None else self.seed,
                "system": args.system if args.system is not None else self.system}
        opts = {k: v for k, v in opts.items() if v is not None}
        if args.speculate is not None or self.speculate:
            opts["speculate"] = args.speculate if args.speculate is not None else self.speculate
        if args.raw:
            opts["chat"] = False
        if args.steer:
            opts["steering"] = spec_mix(args.steer, session.vectors, session.big.identity)
        if args.judge:
            opts["judges"] = self.judge_names(args.judge)
        big = layers_arg(args.capture or self.capture or None, session.big.identity.num_layers,
                         "--capture")
        small = (layers_arg(args.capture_small, session.small.identity.num_layers, "--capture-small")
                 if args.capture_small and session.small is not None else None)
        if args.capture_small and session.small is None:
            raise UsageError("--capture-small: there is no small model (%max_load --small ...).")
        if big or small:
            opts["trace"] = TraceConfig(big_layers=big or (), small_layers=small or ())
        return opts

    @staticmethod
    def judge_names(names: Sequence[str]) -> list[str]:
        """``--judge`` values: names of the session's judges, or just ``none``."""
        return [] if list(names) == ["none"] else list(names)

    @magic_arguments()
    @argument("-n", type=int, default=None, metavar="N", help="Tokens to generate.")
    @argument("--temperature", type=float, default=None, metavar="T", help="0: greedy.")
    @argument("--top-p", type=float, default=None, metavar="P", help="Nucleus sampling mass.")
    @argument("--top-k", type=int, default=None, metavar="K", help="Sample among the K best.")
    @argument("--seed", type=int, default=None, metavar="S", help="Sampling seed.")
    @argument("--speculate", type=int, default=None, metavar="K",
              help=f"Speculative decoding: the small model drafts up to K tokens a step for the "
                   f"big one to verify (0: off; at most {MAX_SPECULATE}).")
    @argument("--steer", action="append", default=[], metavar="SPEC",
              help="Extra steering for this cell: 'joy:0.8', '0.5*joy - 0.3*formal@12-16' (repeatable).")
    @argument("--judge", action="append", default=[], metavar="NAME",
              help="Use only these judges (repeatable; 'none': no judges; default: all of the session's).")
    @argument("--capture", default=None, metavar="LAYERS",
              help="Big-model layers whose states to keep per step, e.g. 12-15 or 10,14.")
    @argument("--capture-small", default=None, metavar="LAYERS", help="Small-model layers to keep.")
    @argument("--raw", action="store_true", help="The cell is raw text: no chat template.")
    @argument("--system", default=None, metavar="TEXT", help="System message.")
    @argument("-v", dest="var", default=None, metavar="VAR",
              help="Also store the result (or the handle, with --background) in VAR.")
    @argument("--background", action="store_true",
              help="Return a GenerationHandle at once; the kernel stays free.")
    @argument("--no-stream", action="store_true", help="Show nothing until the result.")
    @argument("--live", action="store_true",
              help="As --background, showing the live token view under the mixer (VAR gets "
                   "that LiveView: .handle, .view, .mixer).")
    @cell_magic
    def max_generate(self, line: str, cell: str):
        """Generate from the cell (the prompt, verbatim); stream the text; return the result."""
        args = parse(self.max_generate, line)
        session = self.need_session()
        prompt = cell.strip("\n")
        if not prompt.strip():
            raise UsageError("the cell is empty; write the prompt below %%max_generate.")
        with usage_errors():
            opts = self.generation_options(args, session)
            if args.live:
                from max_jupyter.jupyter.tokenview import LiveView

                out = LiveView(session, session.start(prompt, **opts))
            elif args.background:
                out = session.start(prompt, **opts)
            else:
                out = self.generate_streamed(session, prompt, opts, stream=self.stream and not args.no_stream)
        if args.var:
            self.shell.user_ns[args.var] = out
        return out

    def generate_streamed(self, session, prompt: str, opts: dict, stream: bool):
        """Blocking generation, streamed into the cell output unless ``stream`` is False.
        Ctrl-C stops it within one step and returns the partial result (as
        ``Session.generate`` does), here with the events read on the cell's thread."""
        if not stream:
            return session.generate(prompt, **opts)
        from max_jupyter.jupyter.stream import StreamDisplay

        handle = session.start(prompt, **opts)
        view = StreamDisplay(self.update_hz)
        try:
            for event in handle.events():
                view.add(event)
            return handle.result()
        except KeyboardInterrupt:
            handle.stop("interrupted")
            return handle.result()
        finally:
            view.close()

    # ---------------------------------------------------------------- %max_steer

    @magic_arguments()
    @argument("command", help="list | show | train | on | off | mix | mixer | save | load | rm | import | export | search")
    @argument("args", nargs="*", help="The subcommand's arguments (NAME, COEF, FILE, ...).")
    @argument("--pos", default=None, help="train: positive examples, $variable (a list) or a file.")
    @argument("--neg", default=None, help="train: negative examples, $variable (a list) or a file.")
    @argument("--layers", default=None, help="train / on: layers, e.g. 12-15 or 10,14.")
    @argument("--method", default=None, help="train: pca_diff or mean_diff.")
    @argument("--as", dest="as_name", default=None, metavar="NAME", help="import: store under NAME.")
    @argument("--layer", type=int, default=None, help="search: the layer to compare at.")
    @argument("-k", type=int, default=5, help="search: how many hits.")
    @argument("--active", action="store_true",
              help="search: the stored vectors nearest to each step of the last result.")
    @no_var_expand
    @line_magic
    def max_steer(self, line: str = ""):
        """Vectors and the live mix: list, show, train, on, off, mix, save, load, rm,
        import, export, search (``%max_steer COMMAND ...``)."""
        tokens = [t if t.startswith(("--pos=", "--neg=")) else self.expand(t) for t in
                  self._glue_examples(split_line(line))]
        args = self.max_steer.parser.parse_args(tokens)
        return self.dispatch("steer", args)

    @staticmethod
    def _glue_examples(tokens: list[str]) -> list[str]:
        out, it = [], iter(tokens)
        for token in it:
            value = next(it, None) if token in ("--pos", "--neg") else None
            out.append(f"{token}={value}" if value is not None else token)
        return out

    def dispatch(self, group: str, args):
        """Run ``self._<group>_<command>(args)`` with fixable errors as ``UsageError``."""
        method = getattr(self, f"_{group}_{args.command}", None)
        if method is None:
            names = sorted(n[len(group) + 2:] for n in dir(self) if n.startswith(f"_{group}_"))
            raise UsageError(f"unknown %max_{group} command {args.command!r}; use one of "
                             f"{', '.join(names)}.")
        args.group = group
        with usage_errors():
            return method(args)

    @staticmethod
    def positional(args, names: Sequence[str], optional: int = 0) -> list:
        """The subcommand's positional arguments as ``names`` (the last ``optional`` may be
        missing: None)."""
        given = list(args.args)
        if not len(names) - optional <= len(given) <= len(names):
            usage = " ".join(n if i < len(names) - optional else f"[{n}]" for i, n in enumerate(names))
            raise UsageError(f"%max_{args.group} {args.command} takes {usage}; got {given or 'nothing'}.")
        return given + [None] * (len(names) - len(given))

    def _steer_list(self, args):
        session = self.need_session()
        self.positional(args, [])
        from max_jupyter.jupyter.listing import vector_table

        return vector_table(session)

    def _steer_show(self, args):
        session = self.need_session()
        (name,) = self.positional(args, ["NAME"])
        from max_jupyter.jupyter.listing import vector_details

        return vector_details(session, name)

    def _steer_train(self, args):
        session = self.need_session()
        (name,) = self.positional(args, ["NAME"])
        if args.pos is None or args.neg is None:
            raise UsageError("%max_steer train NAME needs --pos and --neg ($list variables or files).")
        pos, neg = self.examples(args.pos, "--pos"), self.examples(args.neg, "--neg")
        layers = layers_arg(args.layers, session.big.identity.num_layers, "--layers")
        kwargs = {"method": args.method} if args.method else {}
        vector = session.train(name, pos, neg, layers=layers, **kwargs)
        print(f"trained {name!r} from {len(pos)} pairs at layers {_span(vector.layers)}")

    def _steer_on(self, args):
        session = self.need_session()
        name, coef = self.positional(args, ["NAME", "COEF"])
        vector = lookup_vector(session.vectors, name)
        layers = layers_arg(args.layers, session.big.identity.num_layers, "--layers")
        mix = spec_mix([SteerTerm(name, _number(coef, "COEF"), layers)], {name: vector},
                       session.big.identity)
        entry = mix.entries[name]
        session.mix.set(name, entry.vector, entry.coef, entry.layers)
        print(_mix_line(session.mix))

    def _steer_off(self, args):
        session = self.need_session()
        (name,) = self.positional(args, ["NAME"], optional=1)
        if name is None:
            session.mix.clear()
        elif name not in session.mix:
            raise UsageError(f"{name!r} is not in the live mix; it has {sorted(session.mix.entries) or 'nothing'}.")
        else:
            session.mix.remove(name)
        print(_mix_line(session.mix))

    def _steer_mixer(self, args):
        session = self.need_session()
        self.positional(args, [])
        return session.mixer()

    def _steer_mix(self, args):
        session = self.need_session()
        self.positional(args, [])
        print(_mix_line(session.mix))
        for name, mix in session.mixes.items():
            print(f"judge-gated mix {name!r}: {_mix_line(mix)}")

    def _steer_save(self, args):
        session = self.need_session()
        (name,) = self.positional(args, ["NAME"])
        vector = session.mix.combined()
        if vector is None:
            raise UsageError("the live mix is empty; turn vectors on with %max_steer on NAME COEF first.")
        session.vectors[name] = vector
        print(f"saved the live mix ({_mix_line(session.mix)}) as {name!r}")

    def _steer_load(self, args):
        session = self.need_session()
        (name,) = self.positional(args, ["NAME"])
        vector = lookup_vector(session.vectors, name)
        session.mix.clear()
        session.mix.set(name, vector, 1.0)
        print(_mix_line(session.mix))

    def _steer_rm(self, args):
        session = self.need_session()
        (name,) = self.positional(args, ["NAME"])
        lookup_vector(session.vectors, name)
        del session.vectors[name]
        print(f"removed {name!r}")

    def _steer_import(self, args):
        session = self.need_session()
        (path,) = self.positional(args, ["FILE"])
        from max_jupyter.steering.interchange import import_vector

        name = args.as_name or Path(path).stem
        vector = import_vector(Path(path).expanduser(), session.big.identity, label=name)
        session.vectors[name] = vector
        print(f"imported {path} as {name!r} (layers {_span(vector.layers)})")

    def _steer_export(self, args):
        session = self.need_session()
        name, path = self.positional(args, ["NAME", "FILE"])
        from max_jupyter.steering.interchange import export_vector

        export_vector(lookup_vector(session.vectors, name), Path(path).expanduser())
        print(f"exported {name!r} to {path}")

    def _steer_search(self, args):
        session = self.need_session()
        from max_jupyter.jupyter.listing import search

        return search(session, args)

    # ---------------------------------------------------------------- %max_judge

    @magic_arguments()
    @argument("command", help="probe | divergence | off | list")
    @argument("args", nargs="*", help="probe: VECTOR (for the small model); off: [NAME].")
    @argument("--threshold", type=float, default=None, metavar="T", help="Fire above T.")
    @argument("--hysteresis", type=float, default=0.0, metavar="H", help="probe: switch off below T - H.")
    @argument("--cooldown", type=int, default=0, metavar="N", help="probe: hold a switch N steps.")
    @argument("--layer", type=int, default=None, help="probe: the small-model layer to read.")
    @argument("--measure", default="entropy", choices=["entropy", "kl"], help="divergence: what to measure.")
    @argument("--steer", default=None, metavar="SPEC", help="The mix the judge turns on (creates it).")
    @argument("--mix", default=None, metavar="NAME", help="Name of that mix (default: the judge's name).")
    @argument("--name", default=None, help="The judge's name.")
    @line_magic
    def max_judge(self, line: str = ""):
        """Judges that turn judge-gated mixes on while generating: probe, divergence, off, list."""
        return self.dispatch("judge", parse(self.max_judge, line))

    def _judge_probe(self, args):
        from max_jupyter.orchestrator.judges import ProbeJudge

        session = self.need_session()
        (name,) = self.positional(args, ["VECTOR"])
        vector = lookup_vector(session.vectors, name)
        threshold = _required(args.threshold, "--threshold")
        mix = self._judge_mix(args, session, args.name or f"probe:{name}")
        self._add_judge(session, lambda: ProbeJudge(vector, args.layer, threshold, args.hysteresis,
                                                    args.cooldown, mix=mix, name=args.name))

    def _judge_divergence(self, args):
        from max_jupyter.orchestrator.judges import DivergenceJudge

        session = self.need_session()
        self.positional(args, [])
        threshold = _required(args.threshold, "--threshold")
        mix = self._judge_mix(args, session, args.name or f"{args.measure}>{threshold:g}")
        self._add_judge(session, lambda: DivergenceJudge(threshold, args.measure, mix=mix,
                                                         name=args.name))

    def _judge_mix(self, args, session, default: str) -> str:
        """The judge-gated mix's name; ``--steer`` (re)defines it in ``session.mixes``."""
        name = args.mix or default
        if args.steer is not None:
            self._new_mix = None if name in session.mixes else name
            session.mixes[name] = spec_mix([args.steer], session.vectors, session.big.identity)
        elif name not in session.mixes:
            raise UsageError(f"the judge would turn on mix {name!r}, which does not exist; give "
                             f"--steer SPEC (e.g. --steer joy:0.8) to define it.")
        return name

    def _add_judge(self, session, make) -> None:
        """Build a judge with ``make()``, check it fits the session, add it; input errors
        from the judge's own checks become ``UsageError``."""
        from max_jupyter.orchestrator.judges import check_judges

        small = session.small.identity if session.small is not None else None
        try:
            judge = make()
            check_judges([judge], session.mixes, session.big.identity, small,
                         small is not None and small.vocab_size == session.big.identity.vocab_size)
        except BaseException as e:
            session.mixes.pop(self._new_mix, None)  # a refused judge leaves nothing behind
            if isinstance(e, MaxJupyterError) or not isinstance(e, (ValueError, KeyError, IndexError)):
                raise
            raise UsageError(str(e).strip("'\"")) from None
        finally:
            self._new_mix = None
        session.judges[judge.name] = judge
        print(f"judge {judge.name!r} on (turns on mix {judge.mixes[0]!r}); judges: {sorted(session.judges)}")

    def _judge_off(self, args):
        session = self.need_session()
        (name,) = self.positional(args, ["NAME"], optional=1)
        if name is None:
            session.judges.clear()
        elif name not in session.judges:
            raise UsageError(f"no judge {name!r}; the session has {sorted(session.judges) or 'none'}.")
        else:
            del session.judges[name]
        print(f"judges: {sorted(session.judges) or 'none'}")

    def _judge_list(self, args):
        session = self.need_session()
        self.positional(args, [])
        if not session.judges:
            print("no judges (add one with %max_judge probe VECTOR --threshold T --steer SPEC)")
        for name, judge in session.judges.items():
            kind = "post-step" if judge.post_step else "pre-step"
            threshold = getattr(judge, "threshold", None)
            print(f"{name}: {type(judge).__name__}, {kind}"
                  + (f", threshold {threshold:g}" if threshold is not None else "")
                  + f", turns on {list(judge.mixes)}")

    # ---------------------------------------------------------------- %max_sweep

    @magic_arguments()
    @argument("vector", metavar="NAME", help="The vector to sweep, optionally NAME@LAYERS.")
    @argument("--coefs", required=True, help="START:STOP:STEP (stop included) or a list -1,0,1.")
    @argument("--prompt", default=None, help="The prompt (line form; in the cell form the cell is the prompt).")
    @argument("-n", type=int, default=None, metavar="N", help="Tokens per row.")
    @argument("--temperature", type=float, default=None, metavar="T", help="0: greedy.")
    @argument("--top-p", type=float, default=None, metavar="P", help="Nucleus sampling mass.")
    @argument("--top-k", type=int, default=None, metavar="K", help="Sample among the K best.")
    @argument("--seed", type=int, default=None, metavar="S", help="Sampling seed (the same for every row).")
    @argument("--system", default=None, metavar="TEXT", help="System message.")
    @argument("--raw", action="store_true", help="No chat template.")
    @argument("-v", dest="var", default=None, metavar="VAR", help="Also store the Sweep in VAR.")
    @line_cell_magic
    def max_sweep(self, line: str, cell: str | None = None):
        """Generate the same prompt with NAME at each coefficient; returns a ``Sweep`` (a table
        of texts with the unsteered model's perplexity of each; ``.plot()`` charts it)."""
        from max_jupyter.jupyter.sweep import parse_coefs, run_sweep

        args = parse(self.max_sweep, line)
        session = self.need_session()
        prompt = cell.strip("\n") if cell is not None else args.prompt
        if not prompt or not prompt.strip():
            raise UsageError("%max_sweep needs a prompt: --prompt TEXT, or the cell form %%max_sweep.")
        with usage_errors():
            terms = parse_spec(args.vector)
            if len(terms) != 1:
                raise UsageError(f"%max_sweep {args.vector}: sweep one vector at a time (name it, "
                                 f"e.g. joy); to sweep a combination, save it under a name first.")
            (term,) = terms
            if term.coef != 1.0:
                raise UsageError(f"%max_sweep {args.vector}: give the vector without a coefficient; "
                                 f"--coefs sets them.")
            opts = {k: v for k, v in self.generation_options(_as_generate(args), session).items()
                    if k != "trace"}
            sweep = run_sweep(session, prompt, term, parse_coefs(args.coefs), **opts)
        if args.var:
            self.shell.user_ns[args.var] = sweep
        return sweep

    # ---------------------------------------------------------------- %max_serve

    @magic_arguments()
    @argument("command", nargs="?", default="start", choices=["start", "stop", "status"],
              help="start (default), stop, or status.")
    @argument("--port", type=int, default=8000, help="TCP port (0: any free port).")
    @argument("--host", default="127.0.0.1", help="Interface to bind (default: this machine only).")
    @argument("--api-key", default=None, metavar="KEY", help="Require 'Authorization: Bearer KEY'.")
    @line_magic
    def max_serve(self, line: str = ""):
        """Serve the session over an OpenAI-compatible HTTP API from a thread of the kernel."""
        args = parse(self.max_serve, line)
        if args.command == "stop":
            if self.server is None or not self.server.running:
                print("the server is not running")
                return
            self.server.stop()
            print("server stopped")
            return
        if args.command == "status":
            print(self.server if self.server is not None else "no server")
            return
        session = self.need_session()
        try:
            from max_jupyter.server import BackgroundServer
        except ImportError as e:
            raise UsageError(f"%max_serve needs the server extra ({e.name} is missing): "
                             f"pip install 'max-jupyter[server]'") from None

        if self.server is not None and self.server.running:
            raise UsageError(f"the server is already running at {self.server.url}; %max_serve stop first.")
        with usage_errors():
            server = BackgroundServer(session, host=args.host, port=args.port, api_key=args.api_key)
            url = server.start()
        self.server = server
        print(f"serving at {url}/v1 (OpenAI-compatible); %max_serve stop to end")
        return url

    def stop_server(self) -> None:
        """Stop ``%max_serve``'s server if it runs (the session stays open)."""
        if self.server is not None:
            self.server.stop()
            self.server = None


def _as_generate(args):
    """Sweep options seen as %%max_generate's (no steer, judge, capture or speculate
    options; the ``speculate`` trait still applies)."""
    for name in ("steer", "judge"):
        setattr(args, name, [])
    args.capture = args.capture_small = args.speculate = None
    return args


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number.") from None


def _required(value, what: str):
    if value is None:
        raise UsageError(f"{what} is required here.")
    return value


def _span(layers: Sequence[int]) -> str:
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _mix_line(mix) -> str:
    entries = mix.entries
    if not entries:
        return "live mix: empty"
    return "live mix: " + "; ".join(
        f"{n} {e.coef:+g}" + (f" @{_span(e.layers)}" if e.layers is not None else "")
        for n, e in entries.items())
