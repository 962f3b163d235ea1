"""A steering expression made ready for a generation: the entries that always apply as one
mix, and each gated clause (``@when:probe>x``) as a named mix with the ``ProbeJudge`` that
turns it on — so a gate runs, scores and shows in the trace like any judge."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.orchestrator.judges import Judge, ProbeJudge
from max_jupyter.steering.expression import Expression, Gate, Means, entries, fail_at, lookup, parse
from max_jupyter.steering.mix import Mix
from max_jupyter.steering.vector import SteeringVector


@dataclass
class CompiledSteering:
    """``mix``: the clauses without a gate; ``mixes``: gated clause name -> its mix;
    ``judges``: one ``ProbeJudge`` per gate, turning on its clause's mix."""

    mix: Mix
    mixes: dict[str, Mix]
    judges: list[Judge]


def compile_steering(expression: str | Expression, vectors: Mapping[str, SteeringVector],
                     big: ModelIdentity, small: ModelIdentity | None, means: Means | None = None,
                     what: str = "steering") -> CompiledSteering:
    """``expression`` (text or parsed) resolved against ``vectors`` for the big model
    ``big``; a gate's probe must be a vector of the small model ``small``, read at its one
    layer (of several: the middle one). ``BadArgumentError`` naming the column first."""
    expr = parse(expression, what) if isinstance(expression, str) else expression
    mix, mixes, judges = Mix(big), {}, []
    always = {}
    for clause, made in entries(expr, vectors, big, means):
        if clause.gate is None:
            always.update(made)
            continue
        name = f"when:{clause}"
        mixes[name] = Mix(big)
        mixes[name].assign(made)
        judges.append(_gate_judge(expr, clause.gate, name, vectors, small, len(judges)))
    mix.assign(always)
    return CompiledSteering(mix, mixes, judges)


def _gate_judge(expr: Expression, gate: Gate, mix: str, vectors: Mapping[str, SteeringVector],
                small: ModelIdentity | None, index: int) -> ProbeJudge:
    if small is None:
        fail_at(expr, f"the gate {gate} reads the small model, and the session has none "
                    f"(Session.load(small=...))", gate.column)
    probe = lookup(expr, gate.probe, gate.column, vectors, small)
    layer = probe.layers[len(probe.layers) // 2]
    sign = 1.0 if gate.above else -1.0  # '<': the negated probe above the negated threshold
    return ProbeJudge(sign * probe, layer, sign * gate.threshold, mix=mix,
                      name=f"{gate}" + (f"#{index + 1}" if index else ""))
