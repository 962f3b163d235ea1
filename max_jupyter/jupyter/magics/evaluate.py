"""``%max_eval``: evaluate a vector or a library concept (``Session.evaluate``)."""
from __future__ import annotations

from IPython.core.magic_arguments import argument, magic_arguments

from max_jupyter.jupyter.magics.arguments import parse, usage_errors
from max_jupyter.jupyter.sweep import parse_coefs


@magic_arguments()
@argument("vector", metavar="NAME", help="A library concept (e.g. joy) or a library vector's name.")
@argument("--concept", default=None, help="The concept NAME should carry (default: NAME itself).")
@argument("--coefs", default=None, help="START:STOP:STEP or a list 0.1,0.5,1 (default: the evaluation's).")
@argument("--prompts", type=int, default=None, metavar="N", help="Use the concept's first N prompts.")
@argument("-n", type=int, default=None, metavar="N", help="Tokens per answer (default 48).")
@argument("--seed", type=int, default=0, metavar="S", help="Seed of the random control and the references.")
@argument("--plot", action="store_true", help="Also show concept against fluency per coefficient.")
@argument("-v", dest="var", default=None, metavar="VAR", help="Also store the Evaluation in VAR.")
def max_eval(magics, line: str):
    """Evaluate NAME for its concept: each coefficient against no steering, prompting, a
    random vector and the flipped vector, scored 0-2 (concept, fluency, relevance) on held-out
    prompts; returns an ``Evaluation`` (a table; ``.to_pandas()``; ``plot_evaluation``)."""
    from max_jupyter.steering.concepts import concept

    args = parse(max_eval, line)
    session = magics.need_session()
    with usage_errors():
        kwargs = {"coefs": parse_coefs(args.coefs) if args.coefs else None, "seed": args.seed,
                  "concept": args.concept}
        if args.n is not None:
            kwargs["max_new_tokens"] = args.n
        if args.prompts is not None:
            kwargs["prompts"] = concept(args.concept or args.vector).prompts[:max(args.prompts, 0)]
        ev = session.evaluate(args.vector, **kwargs)
    if args.var:
        magics.shell.user_ns[args.var] = ev
    if args.plot and ev.rows:
        from IPython.display import display

        from max_jupyter.jupyter.plots import plot_evaluation

        display(ev)
        display(plot_evaluation(ev))
        return None
    return ev
