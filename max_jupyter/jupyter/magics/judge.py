"""``%max_judge``: judges that turn judge-gated mixes on while generating (probe,
divergence, off, list). The router (``MaxMagics``) maps each sub-command to one function
here; each takes the magics and the parsed options."""
from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from max_jupyter.errors import MaxJupyterError, did_you_mean
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
    mix, mixes = _judge_mix(args, session, args.name or f"probe:{name}")
    _add_judge(session, mixes, lambda: ProbeJudge(vector, args.layer, threshold, args.hysteresis,
                                                  args.cooldown, mix=mix, name=args.name))


def divergence(magics, args):
    from max_jupyter.orchestrator.judges import DivergenceJudge

    session = magics.need_session()
    positional(args, [])
    threshold = required(args.threshold, "--threshold")
    mix, mixes = _judge_mix(args, session, args.name or f"{args.measure}>{threshold:g}")
    _add_judge(session, mixes, lambda: DivergenceJudge(threshold, args.measure, mix=mix,
                                                       name=args.name))


def _judge_mix(args, session, default: str) -> tuple[str, dict]:
    """The judge-gated mix's name, and the mixes ``Session.add_judge`` adds with the judge:
    ``--steer`` (re)defines that mix, otherwise it must already be in ``session.mixes``."""
    name = args.mix or default
    if args.steer is not None:
        return name, {name: spec_mix([args.steer], session.vectors, session.big.identity)}
    if name not in session.mixes:
        raise UsageError(f"the judge would turn on mix {name!r}, which does not exist; give "
                         f"--steer SPEC (e.g. --steer joy:0.8) to define it.")
    return name, {}


def _add_judge(session, mixes: dict, make) -> None:
    """Build a judge with ``make()`` and add it with ``mixes`` through the Session, which
    checks it fits first (a refused judge changes nothing); input errors from the judge's
    own checks become ``UsageError``."""
    try:
        judge = make()
        session.add_judge(judge.name, judge, mixes)
    except (ValueError, KeyError, IndexError) as e:
        if isinstance(e, MaxJupyterError):
            raise
        raise UsageError(str(e).strip("'\"")) from None
    print(f"judge {judge.name!r} on (turns on mix {judge.turns_on[0]!r}); judges: {sorted(session.judges)}")


def off(magics, args):
    """Remove one judge (or all) and the mixes their ``--steer`` added that no judge uses."""
    session = magics.need_session()
    (name,) = positional(args, ["NAME"], optional=1)
    if name is not None and name not in session.judges:
        raise UsageError(f"no judge {name!r}{did_you_mean(name, session.judges)}; the session has "
                         f"{sorted(session.judges) or 'none'}.")
    removed = [m for judge in ([name] if name else list(session.judges))
               for m in session.remove_judge(judge)]
    print(f"judges: {sorted(session.judges) or 'none'}"
          + (f"; removed mix {', '.join(map(repr, removed))}" if removed else ""))


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
