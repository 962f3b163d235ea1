"""``%max_judge``: judges that turn judge-gated mixes on while generating (probe,
divergence, off, list). The router (``MaxMagics``) maps each sub-command to one function
here; each takes the magics and the parsed options."""
from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from max_jupyter.errors import MaxJupyterError
from max_jupyter.jupyter.magics.arguments import parse, positional, required
from max_jupyter.jupyter.steerspec import lookup_vector, spec_mix


@magic_arguments()
@argument("command", help="probe | divergence | off | list")
@argument("args", nargs="*", help="probe: VECTOR (for the small model); off: [NAME].")
@argument("--threshold", type=float, default=None, metavar="T", help="Fire above T.")
@argument("--hysteresis", type=float, default=0.0, metavar="H", help="probe: switch off below T - H.")
@argument("--cooldown", type=int, default=0, metavar="N", help="probe: hold a switch N steps.")
@argument("--layer", type=int, default=None, help="probe: the small-model layer to read.")
@argument("--measure", default="entropy", choices=["entropy", "kl"], help="divergence: what to measure.")
@argument("--steer", default=None, metavar="SPEC",
          help="The mix the judge turns on (creates it; quote an expression that has spaces).")
@argument("--mix", default=None, metavar="NAME", help="Name of that mix (default: the judge's name).")
@argument("--name", default=None, help="The judge's name.")
def max_judge(magics, line: str = ""):
    """Judges that turn judge-gated mixes on while generating: probe, divergence, off, list."""
    return magics.route("judge", parse(max_judge, line))


def probe(magics, args):
    from max_jupyter.orchestrator.judges import ProbeJudge

    session = magics.need_session()
    (name,) = positional(args, ["VECTOR"])
    vector = lookup_vector(session.vectors, name)
    threshold = required(args.threshold, "--threshold")
    mix, new = _judge_mix(args, session, args.name or f"probe:{name}")
    _add_judge(session, new, lambda: ProbeJudge(vector, args.layer, threshold, args.hysteresis,
                                                args.cooldown, mix=mix, name=args.name))


def divergence(magics, args):
    from max_jupyter.orchestrator.judges import DivergenceJudge

    session = magics.need_session()
    positional(args, [])
    threshold = required(args.threshold, "--threshold")
    mix, new = _judge_mix(args, session, args.name or f"{args.measure}>{threshold:g}")
    _add_judge(session, new, lambda: DivergenceJudge(threshold, args.measure, mix=mix,
                                                     name=args.name))


def _judge_mix(args, session, default: str) -> tuple[str, str | None]:
    """The judge-gated mix's name, and that name again if ``--steer`` has just created it
    (else None); ``--steer`` (re)defines the mix in ``session.mixes``."""
    name = args.mix or default
    if args.steer is not None:
        new = None if name in session.mixes else name
        session.mixes[name] = spec_mix([args.steer], session.vectors, session.big.identity)
        return name, new
    if name not in session.mixes:
        raise UsageError(f"the judge would turn on mix {name!r}, which does not exist; give "
                         f"--steer SPEC (e.g. --steer joy:0.8) to define it.")
    return name, None


def _add_judge(session, new_mix: str | None, make) -> None:
    """Build a judge with ``make()``, check it fits the session, add it; input errors
    from the judge's own checks become ``UsageError``, and a refused judge leaves no
    ``new_mix`` (the mix its ``--steer`` just made) behind."""
    from max_jupyter.orchestrator.judges import check_judges

    small = session.small.identity if session.small is not None else None
    try:
        judge = make()
        check_judges([judge], session.mixes, session.big.identity, small,
                     small is not None and small.vocab_size == session.big.identity.vocab_size)
    except BaseException as e:
        session.mixes.pop(new_mix, None)
        if isinstance(e, MaxJupyterError) or not isinstance(e, (ValueError, KeyError, IndexError)):
            raise
        raise UsageError(str(e).strip("'\"")) from None
    session.judges[judge.name] = judge
    print(f"judge {judge.name!r} on (turns on mix {judge.turns_on[0]!r}); judges: {sorted(session.judges)}")


def off(magics, args):
    session = magics.need_session()
    (name,) = positional(args, ["NAME"], optional=1)
    if name is None:
        session.judges.clear()
    elif name not in session.judges:
        raise UsageError(f"no judge {name!r}; the session has {sorted(session.judges) or 'none'}.")
    else:
        del session.judges[name]
    print(f"judges: {sorted(session.judges) or 'none'}")


def list_judges(magics, args):
    session = magics.need_session()
    positional(args, [])
    if not session.judges:
        print("no judges (add one with %max_judge probe VECTOR --threshold T --steer SPEC)")
    for name, judge in session.judges.items():
        kind = "post-step" if judge.post_step else "pre-step"
        threshold = getattr(judge, "threshold", None)
        print(f"{name}: {type(judge).__name__}, {kind}"
              + (f", threshold {threshold:g}" if threshold is not None else "")
              + f", turns on {list(judge.turns_on)}")
