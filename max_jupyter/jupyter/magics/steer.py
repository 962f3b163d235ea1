"""``%max_steer``: the vector library and the live mix (list, show, train, on, off, set,
mix, mixer, save, load, rm, import, export, search). The router (``MaxMagics``) maps each
sub-command to one function here; each takes the magics and the parsed options."""
from __future__ import annotations

from pathlib import Path

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from max_jupyter.jupyter.magics.arguments import (
    layers_arg,
    mix_line,
    number,
    parse_tokens,
    positional,
    span,
    split_line,
)
from max_jupyter.jupyter.steerspec import SteerTerm, lookup_vector, spec_mix


@magic_arguments()
@argument("command", help="list | concepts | show | train | on | off | set | mix | mixer | save | load | rm | "
                          "import | export | search")
@argument("args", nargs="*", help="The subcommand's arguments (NAME, COEF, FILE, ...).")
@argument("--pos", default=None, help="train: positive examples, $variable (a list) or a file.")
@argument("--neg", default=None, help="train: negative examples, $variable (a list) or a file.")
@argument("--layers", default=None, help="train / on: layers, e.g. 12-15 or 10,14.")
@argument("--method", default=None,
          help="train: svd_diff (the default), pca_diff_unit (repeng's pca_diff) or mean_diff.")
@argument("--read", default=None,
          help="train: where the states are read: last_token (the default) or reply (as chat "
               "replies, averaged over their tokens, as probes read).")
@argument("--as", dest="as_name", default=None, metavar="NAME", help="import: store under NAME.")
@argument("--layer", type=int, default=None, help="search: the layer to compare at.")
@argument("-k", type=int, default=5, help="search: how many hits.")
@argument("--active", action="store_true",
          help="search: the stored vectors nearest to each step of the last result.")
def max_steer(magics, line: str = ""):
    """Vectors and the live mix: list, concepts, show, train, on, off, set EXPRESSION, mix,
    save, load, rm, import, export, search (``%max_steer COMMAND ...``)."""
    tokens = [t if t.startswith(("--pos=", "--neg=")) else magics.expand(t) for t in
              _glue_examples(split_line(line))]
    return magics.route("steer", parse_tokens(max_steer, tokens))


def _glue_examples(tokens: list[str]) -> list[str]:
    """``--pos VALUE`` as ``--pos=VALUE`` (so the ``$name`` is not expanded)."""
    out, it = [], iter(tokens)
    for token in it:
        value = next(it, None) if token in ("--pos", "--neg") else None
        out.append(f"{token}={value}" if value is not None else token)
    return out


def examples(magics, value: str, what: str) -> list[str]:
    """``--pos`` / ``--neg``: ``$name`` of a list of strings, or a file with one per line."""
    if value.startswith("$"):
        name = value[1:]
        if name not in magics.shell.user_ns:
            raise UsageError(f"{what} {value}: no variable {name!r} in the namespace.")
        items = magics.shell.user_ns[name]
        if isinstance(items, str) or not all(isinstance(x, str) for x in items):
            raise UsageError(f"{what} {value}: {name!r} must be a list of strings.")
        return list(items)
    path = Path(magics.expand(value)).expanduser()
    if not path.is_file():
        raise UsageError(f"{what} {value!r}: neither $variable (a list of strings) nor a file "
                         f"with one example per line.")
    return [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def list_vectors(magics, args):
    session = magics.need_session()
    positional(args, [])
    from max_jupyter.jupyter.listing import vector_table

    return vector_table(session)


def concepts(magics, args):
    positional(args, [])
    from max_jupyter.jupyter.listing import concept_table

    return concept_table(magics.session if magics.session is not None and not magics.session.closed
                         else None)


def show(magics, args):
    session = magics.need_session()
    (name,) = positional(args, ["NAME"])
    from max_jupyter.jupyter.listing import vector_details

    return vector_details(session, name)


def train(magics, args):
    session = magics.need_session()
    (name,) = positional(args, ["NAME"])
    if args.pos is None or args.neg is None:
        raise UsageError("%max_steer train NAME needs --pos and --neg ($list variables or files).")
    pos, neg = examples(magics, args.pos, "--pos"), examples(magics, args.neg, "--neg")
    layers = layers_arg(args.layers, session.big.identity.num_layers, "--layers")
    kwargs = {key: value for key, value in (("method", args.method), ("read", args.read)) if value}
    vector = session.train(name, pos, neg, layers=layers, **kwargs)
    print(f"trained {name!r} from {len(pos)} pairs at layers {span(vector.layers)}")


def on(magics, args):
    session = magics.need_session()
    name, coef = positional(args, ["NAME", "COEF"])
    vector = lookup_vector(session.vectors, name)
    layers = layers_arg(args.layers, session.big.identity.num_layers, "--layers")
    mix = spec_mix([SteerTerm(name, number(coef, "COEF"), layers)], {name: vector},
                   session.big.identity)
    entry = mix.entries[name]
    session.mix.set(name, entry.vector, entry.coef, entry.layers)
    print(mix_line(session.mix))


def off(magics, args):
    session = magics.need_session()
    (name,) = positional(args, ["NAME"], optional=1)
    if name is None:
        session.steer(None)  # the live mix and the gates of an expression
    elif name not in session.mix:
        raise UsageError(f"{name!r} is not in the live mix; it has {sorted(session.mix.entries) or 'nothing'}.")
    else:
        session.mix.remove(name)
    print(mix_line(session.mix))


def set_(magics, args):
    """``%max_steer set EXPRESSION``: the live mix becomes the expression (docs/steering.md),
    its gates the session's judges."""
    session = magics.need_session()
    if not args.args:
        raise UsageError("%max_steer set needs an expression, e.g. %max_steer set 0.3 joy @response")
    session.steer(" ".join(args.args), "%max_steer set")
    print(f"live mix: {session.expression() or 'empty'}")


def mixer(magics, args):
    session = magics.need_session()
    positional(args, [])
    from max_jupyter.jupyter.mixer import Mixer

    return Mixer(session)


def mix(magics, args):
    session = magics.need_session()
    positional(args, [])
    print(mix_line(session.mix))
    for name, gated in session.mixes.items():
        print(f"judge-gated mix {name!r}: {mix_line(gated)}")


def save(magics, args):
    """The live mix as its expression in the store (a library without saved mixes, a dict,
    gets the mix's sum as a vector, as before)."""
    session = magics.need_session()
    (name,) = positional(args, ["NAME"])
    expression = session.expression()
    if not expression:
        raise UsageError("the live mix is empty; turn vectors on with %max_steer on NAME COEF first.")
    if callable(getattr(session.vectors, "save_mix", None)):
        session.vectors.save_mix(name, expression, session.big.identity)
        print(f"saved the live mix as {name!r}: {expression}")
        return
    vector = session.mix.combined(session.big)
    if vector is None:
        raise UsageError("this library keeps vectors only; the live mix adds nothing to sum into one.")
    session.vectors[name] = vector
    push = vector.push(session.big.residual_norms)
    print(f"saved the live mix ({mix_line(session.mix)}) as {name!r}; "
          f"%max_steer on {name} {push:.2f} adds the same")


def load(magics, args):
    """A saved mix (its expression becomes the live mix), else the vector NAME alone."""
    session = magics.need_session()
    (name,) = positional(args, ["NAME"])
    if callable(getattr(session.vectors, "mix_names", None)) and name in session.vectors.mix_names():
        expression, _model = session.vectors.load_mix(name)
        session.steer(expression, f"saved mix {name!r}")
        print(f"live mix: {session.expression()}")
        return
    vector = lookup_vector(session.vectors, name)
    session.mix.clear()
    session.mix.set(name, vector, 1.0)
    print(mix_line(session.mix))


def rm(magics, args):
    session = magics.need_session()
    (name,) = positional(args, ["NAME"])
    lookup_vector(session.vectors, name)
    del session.vectors[name]
    print(f"removed {name!r}")


def import_(magics, args):
    session = magics.need_session()
    (path,) = positional(args, ["FILE"])
    from max_jupyter.steering.interchange import import_vector

    name = args.as_name or Path(path).stem
    vector = import_vector(Path(path).expanduser(), session.big.identity, label=name)
    session.vectors[name] = vector
    print(f"imported {path} as {name!r} (layers {span(vector.layers)})")


def export(magics, args):
    session = magics.need_session()
    name, path = positional(args, ["NAME", "FILE"])
    from max_jupyter.steering.interchange import export_vector

    export_vector(lookup_vector(session.vectors, name), Path(path).expanduser())
    print(f"exported {name!r} to {path}")


def search(magics, args):
    session = magics.need_session()
    from max_jupyter.jupyter.listing import search as search_library

    return search_library(session, args)
