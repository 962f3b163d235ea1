"""``--steer`` specs and layer lists of the magics, read by the one steering expression
parser (``steering.expression``; the grammar is in docs/steering.md): ``joy:0.8``,
``"0.5*joy - 0.3*formal@12-16"``, ``"0.3 joy @response; !refusal"``.

``parse_spec`` only parses; ``spec_mix`` resolves the names against a vector library into
one mix (gates need the Session: ``%%max_generate --steer`` and ``%max_steer set`` take them).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.errors import BadArgumentError, did_you_mean
from max_jupyter.steering.expression import Term, entries, fail_at, parse, parse_layers
from max_jupyter.steering.mix import Mix
from max_jupyter.steering.vector import SteeringVector

SteerTerm = Term
"""One term of a spec (``name``, ``coef``, ``layers``, and the operation)."""

__all__ = ["SteerTerm", "lookup_vector", "parse_layers", "parse_spec", "spec_mix"]


def parse_spec(spec: str) -> list[SteerTerm]:
    """The terms of one ``--steer`` spec (all clauses); ``BadArgumentError`` (one line,
    with the column) if malformed."""
    return [t for clause in parse(spec, "--steer").clauses for t in clause.terms]


def spec_mix(specs: Iterable[str | SteerTerm], vectors: Mapping[str, SteeringVector],
             model: ModelIdentity) -> Mix | None:
    """One mix for ``model`` from ``--steer`` specs (strings or terms), each name looked
    up in ``vectors``; ``None`` when there are no terms. ``BadArgumentError`` (with the
    column) for an unknown vector, a vector of another model, a layer it lacks or a gate."""
    specs = list(specs)
    if not specs:
        return None
    text = "; ".join(s if isinstance(s, str) else str(s) for s in specs)
    expression = parse(text, "--steer")
    mix, made = Mix(model), {}
    for clause, clause_entries in entries(expression, vectors, model):
        if clause.gate is not None:
            fail_at(expression, "a gate (@when) needs a generation's --steer or %max_steer set",
                    clause.gate.column)
        made.update(clause_entries)
    mix.assign(made)
    return mix


def lookup_vector(vectors: Mapping[str, SteeringVector], name: str) -> SteeringVector:
    """``vectors[name]``, or ``BadArgumentError`` listing the names there are."""
    if name not in vectors:
        known = sorted(vectors)
        raise BadArgumentError(f"unknown vector {name!r}{did_you_mean(name, known)}; the library has "
                               f"{', '.join(known[:12]) + (' ...' if len(known) > 12 else '') if known else 'none'} "
                               f"(train one with %max_steer train, or list them with %max_steer list).")
    return vectors[name]
