"""``%%max_generate``: generate from the cell; and the generation options every magic
that generates shares (``generation_options``)."""
from __future__ import annotations

from collections.abc import Sequence

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from max_jupyter.jupyter.magics.arguments import layers_arg, parse, usage_errors
from max_jupyter.orchestrator.options import GenerationOptions
from max_jupyter.orchestrator.speculative import MAX_SPECULATE
from max_jupyter.steering.expression import parse as parse_expression


def generation_options(magics, args, session) -> GenerationOptions:
    """The session's defaults with the parsed options and the %config traits applied
    (``speculate`` only when ``--speculate`` is given or the trait is not 0: otherwise
    the session's default stands); checked here, once, by ``GenerationOptions``."""
    opts = {"max_new_tokens": args.n if args.n is not None else magics.max_new_tokens,
            "temperature": args.temperature if args.temperature is not None else magics.temperature,
            "top_p": args.top_p if args.top_p is not None else magics.top_p,
            "top_k": args.top_k if args.top_k is not None else magics.top_k,
            "seed": args.seed if args.seed is not None else magics.seed,
            "system": args.system if args.system is not None else magics.system}
    opts = {k: v for k, v in opts.items() if v is not None}
    if args.speculate is not None or magics.speculate:
        opts["speculate"] = args.speculate if args.speculate is not None else magics.speculate
    if args.raw:
        opts["chat"] = False
    if args.steer:
        opts["steering"] = parse_expression("; ".join(args.steer), "--steer")  # names: at start
    if args.judge:
        opts["judges"] = judge_names(args.judge)
    if getattr(args, "probe", None):
        opts["probes"] = args.probe
    opts["trace"] = trace_config(magics, args, session)
    return session.defaults.replace(**opts)


def trace_config(magics, args, session):
    """The session's default ``TraceConfig`` with the cell's ``--capture``,
    ``--capture-small``, ``--capture-prompt``, ``--logits`` and ``--topk``, spelled for the
    magics (an uncaptured layer's error then says ``--capture 14``)."""
    import dataclasses

    big = layers_arg(args.capture or magics.capture or None, session.big.identity.num_layers,
                     "--capture")
    if args.capture_small and session.small is None:
        raise UsageError("--capture-small: there is no small model (%max_load --small ...).")
    small = (layers_arg(args.capture_small, session.small.identity.num_layers, "--capture-small")
             if args.capture_small else None)
    base = session.defaults.trace
    if args.capture_prompt and not (big or base.big_layers):
        raise UsageError("--capture-prompt keeps the prompt's states at the --capture layers; "
                         "give them too, e.g. --capture 14 --capture-prompt.")
    if args.topk is not None and args.topk < 1:
        raise UsageError(f"--topk {args.topk}: keep at least 1 logit per step, e.g. --topk 20.")
    changes = {"spelling": "magic", "big_layers": big, "small_layers": small,
               "prompt": args.capture_prompt or None, "full_logits": args.logits or None,
               "top_k": args.topk}
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


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
          help="Extra steering for this cell, a steering expression (docs/steering.md): "
               "'joy:0.8', '0.3 joy - 0.2 verbose @response', '!refusal', 'joy @first:4' "
               "(repeatable: the clauses add up; quote an expression that has spaces).")
@argument("--judge", action="append", default=[], metavar="NAME",
          help="Use only these judges (repeatable; 'none': no judges; default: all of the session's).")
@argument("--probe", action="append", default=[], metavar="CONCEPT",
          help="Read the text with this library concept's probe after every token "
               "(r.probe_scores; repeatable).")
@argument("--capture", default=None, metavar="LAYERS",
          help="Big-model layers whose states to keep per step, e.g. 12-15 or 10,14.")
@argument("--capture-small", default=None, metavar="LAYERS", help="Small-model layers to keep.")
@argument("--capture-prompt", action="store_true",
          help="Also keep the --capture layers' states at every prompt position "
               "(r.prompt_hidden[layer]: [prompt_len, hidden]).")
@argument("--logits", action="store_true",
          help="Keep every step's full logits (r.big_logits, r.small_logits: [steps, vocab]).")
@argument("--topk", type=int, default=None, metavar="K",
          help="Keep each step's K best logits (r.big_topk; default 10). Sampling among the K "
               "best is --top-k.")
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
def max_generate(magics, line: str, cell: str):
    """Generate from the cell (the prompt, verbatim); stream the text; return the result."""
    args = parse(max_generate, line)
    session = magics.need_session()
    prompt = cell.strip("\n")
    if not prompt.strip():
        raise UsageError("the cell is empty; write the prompt below %%max_generate.")
    with usage_errors():
        opts = generation_options(magics, args, session)
        if args.live:
            from max_jupyter.jupyter.tokenview import LiveView

            out = LiveView(session, session.start(prompt, opts))
        elif args.background:
            out = session.start(prompt, opts)
        else:
            out = generate_streamed(session, prompt, opts, magics.update_hz,
                                    stream=magics.stream and not args.no_stream)
    if args.var:
        magics.shell.user_ns[args.var] = out
    return out


def generate_streamed(session, prompt: str, opts: GenerationOptions, update_hz: float, stream: bool):
    """Blocking generation, streamed into the cell output (at most ``update_hz`` updates a
    second) unless ``stream`` is False. Ctrl-C stops it within one step and returns the
    partial result (as ``Session.generate`` does), here with the events read on the cell's
    thread."""
    if not stream:
        return session.generate(prompt, opts)
    from max_jupyter.jupyter.stream import StreamDisplay

    handle = session.start(prompt, opts)
    view = StreamDisplay(update_hz)
    try:
        for event in handle.events():
            view.add(event)
        return handle.result()
    except KeyboardInterrupt:
        handle.stop("interrupted")
        return handle.result()
    finally:
        view.close()
