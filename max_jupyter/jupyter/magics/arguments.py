"""Parsing a magic's line and turning fixable errors into one-line ``UsageError``s: what
every command module of the magics shares."""
from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator, Sequence

from IPython.core.error import UsageError

from max_jupyter.errors import MaxJupyterError, did_you_mean
from max_jupyter.jupyter.steerspec import parse_layers

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
    return parse_tokens(magic, split_line(line))


def parse_tokens(magic, tokens: list[str]):
    """Parse ``tokens`` with ``magic``'s parser; an unknown option's ``UsageError`` says
    which known option it is close to (difflib)."""
    try:
        return magic.parser.parse_args(tokens)
    except UsageError as e:
        if "unrecognized arguments" not in str(e):
            raise
        options = [o for action in magic.parser._actions for o in action.option_strings]
        unknown = [t.split("=", 1)[0] for t in tokens if t.startswith("--") and
                   t.split("=", 1)[0] not in options]
        hints = [h for h in (did_you_mean(u, options) for u in unknown) if h]
        if not hints:
            raise
        raise UsageError(f"{str(e).rstrip('.')}{''.join(hints)}") from None



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


def positional(args, names: Sequence[str], optional: int = 0) -> list:
    """The sub-command's positional arguments as ``names`` (the last ``optional`` may be
    missing: None)."""
    given = list(args.args)
    if not len(names) - optional <= len(given) <= len(names):
        usage = " ".join(n if i < len(names) - optional else f"[{n}]" for i, n in enumerate(names))
        raise UsageError(f"%max_{args.group} {args.command} takes {usage}; got {given or 'nothing'}.")
    return given + [None] * (len(names) - len(given))


def number(text: str, what: str) -> float:
    """``text`` as a float, or a ``UsageError`` naming ``what``."""
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number.") from None


def required(value, what: str):
    """``value``, or a ``UsageError`` saying ``what`` is required."""
    if value is None:
        raise UsageError(f"{what} is required here.")
    return value


def span(layers: Sequence[int]) -> str:
    """Layers as ``12-15`` when consecutive (more than two), else ``10,14``."""
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def mix_line(mix) -> str:
    """One line describing the live mix's entries (name, coefficient, layers)."""
    entries = mix.entries
    if not entries:
        return "live mix: empty"
    return "live mix: " + "; ".join(
        f"{n} {e.coef:+g}" + (f" @{span(e.layers)}" if e.layers is not None else "")
        for n, e in entries.items())
