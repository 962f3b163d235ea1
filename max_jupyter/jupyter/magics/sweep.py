"""``%max_sweep``: generate one prompt with a vector at each of several coefficients."""
from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from max_jupyter.jupyter.magics.arguments import parse, usage_errors
from max_jupyter.jupyter.magics.generate import generation_options
from max_jupyter.jupyter.steerspec import parse_spec


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
def max_sweep(magics, line: str, cell: str | None = None):
    """Generate the same prompt with NAME at each coefficient; returns a ``Sweep`` (a table
    of texts with the unsteered model's perplexity of each; ``.plot()`` charts it)."""
    from max_jupyter.jupyter.sweep import parse_coefs, run_sweep

    args = parse(max_sweep, line)
    session = magics.need_session()
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
        opts = generation_options(magics, _as_generate(args), session).replace(speculate=0)  # one batch
        sweep = run_sweep(session, prompt, term, parse_coefs(args.coefs), opts)
    if args.var:
        magics.shell.user_ns[args.var] = sweep
    return sweep


def _as_generate(args):
    """Sweep options seen as %%max_generate's (no steer, judge, capture or speculate
    options: the rows run as one batch, without judges or speculation)."""
    for name in ("steer", "judge"):
        setattr(args, name, [])
    args.capture = args.capture_small = args.speculate = args.topk = None
    args.capture_prompt = args.logits = False
    return args
