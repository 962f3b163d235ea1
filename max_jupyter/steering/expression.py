"""The steering expression language: one parser for every place a steering is written
(Python's ``steering=``, ``%%max_generate --steer``, ``%max_steer set``, the Mixer's text
field, the server's ``steering``, a saved mix). The grammar is in docs/steering.md.

``parse`` turns text into an ``Expression`` (clauses of terms with a schedule and maybe a
gate; ``BadArgumentError`` naming the column of the first error). ``entries`` resolves an
expression's names against a vector library into ``MixEntry`` values per clause; the
Session turns gates into judges. ``render`` writes mix entries back as an expression.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.errors import BadArgumentError, did_you_mean
from max_jupyter.steering.mix import ALWAYS, MixEntry, Schedule
from max_jupyter.steering.vector import SteeringVector

_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                    r"|(?P<name>[A-Za-z_][\w./]*)|(?P<op>[-+*:@,;!|=\[\]<>]))")
EXAMPLE = "'0.3 joy - 0.2 verbose @response; !refusal'"
MODIFIERS = ("prompt", "response", "first", "after", "when")


@dataclass(frozen=True)
class Term:
    """One term: ``op`` ``"add"`` (``coef`` times the vector ``name`` with the vectors
    ``removed`` projected out, ``a|b``), ``"ablate"`` (``!name``: its projection set to
    ``target``, a number or ``"mean"``) or ``"clamp"`` (``name[low,high]``: its projection
    limited to ``bounds``); at ``layers`` (None: the vector's own). ``columns``: where each
    name of the operand starts in the text (0-based), for errors found when names are
    resolved."""

    name: str
    coef: float = 1.0
    layers: tuple[int, ...] | None = None
    op: str = "add"
    removed: tuple[str, ...] = ()
    target: float | str = 0.0
    bounds: tuple[float, float] | None = None
    columns: tuple[int, ...] = field(default=(0,), compare=False)

    @property
    def column(self) -> int:
        return self.columns[0]

    @property
    def operand(self) -> str:
        return "|".join((self.name, *self.removed))

    @property
    def key(self) -> str:
        """The mix entry's name: the term without its coefficient and layers."""
        if self.op == "ablate":
            return f"!{self.operand}" + ("" if self.target == 0.0 else f"={_num(self.target)}")
        if self.op == "clamp":
            return f"{self.operand}[{_num(self.bounds[0], '')},{_num(self.bounds[1], '')}]"
        return self.operand

    def __str__(self) -> str:
        at = f"@{','.join(map(str, self.layers))}" if self.layers is not None else ""
        return (f"{self.coef:g}*{self.key}" if self.op == "add" else self.key) + at


@dataclass(frozen=True)
class Gate:
    """``@when:probe>x`` (``above``) or ``@when:probe<x``: the clause applies at a step
    while the small model's projection on the vector ``probe`` is beyond ``threshold``."""

    probe: str
    above: bool
    threshold: float
    column: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"@when:{self.probe}{'>' if self.above else '<'}{self.threshold:g}"


@dataclass(frozen=True)
class Clause:
    """Terms applied together under one ``schedule`` (phase and window) and ``gate``."""

    terms: tuple[Term, ...]
    schedule: Schedule = ALWAYS
    gate: Gate | None = None

    def __str__(self) -> str:
        parts = []
        for i, t in enumerate(self.terms):
            negative = t.op == "add" and t.coef < 0
            text = str(replace(t, coef=-t.coef) if negative else t)
            parts.append(("- " if negative else "" if i == 0 else "+ ") + text)
        return " ".join(p for p in (*parts, str(self.schedule), str(self.gate or "")) if p)


@dataclass(frozen=True)
class Expression:
    """A parsed steering expression: its ``clauses`` (joined by ``;``) and the ``text``."""

    text: str
    clauses: tuple[Clause, ...]
    what: str = field(default="steering", compare=False)
    """Where it was written (``"--steer"``, ...): errors about its names start with it."""

    def __str__(self) -> str:
        return "; ".join(map(str, self.clauses))


def parse(text: str, what: str = "steering") -> Expression:
    """The expression ``text``; ``BadArgumentError`` (one line: ``what``, the text, the
    problem and its column) if it is not one."""
    if not isinstance(text, str):
        raise BadArgumentError(f"{what} is a {type(text).__name__}, not an expression; write e.g. {EXAMPLE}.")
    return _Parser(text, what).expression()


def parse_layers(text: str, what: str = "--layers") -> tuple[int, ...]:
    """Layers like ``12``, ``12-15`` or ``10,12-14`` (inclusive ranges), sorted, unique."""
    try:
        return parse("x@" + text, what).clauses[0].terms[0].layers
    except BadArgumentError:
        raise BadArgumentError(f"{what} {text!r}: write layers as 12, 12-15 or 10,12-14.") from None


class _Parser:
    """Recursive descent over the tokens of one expression; errors name the column."""

    def __init__(self, text: str, what: str):
        self.text, self.what, self.tokens, pos = text, what, [], 0
        while text[pos:].strip():
            m = _TOKEN.match(text, pos)
            if not m:
                col = len(text) - len(text[pos:].lstrip())
                self.fail(f"unexpected {text[col]!r}", col)
            kind = m.lastgroup
            self.tokens.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0

    def fail(self, problem: str, col: int | None = None):
        col = len(self.text) if col is None else col
        raise BadArgumentError(f"{self.what} {self.text!r}: {problem} at column {col + 1}; "
                               f"write e.g. {EXAMPLE} (docs/steering.md).")

    def col(self) -> int | None:
        return self.tokens[self.i][2] if self.i < len(self.tokens) else None

    def peek(self, kind: str | None = None, value: str | None = None, ahead: int = 0) -> bool:
        if self.i + ahead >= len(self.tokens):
            return False
        k, v, _ = self.tokens[self.i + ahead]
        return (kind is None or k == kind) and (value is None or v == value)

    def take(self, kind: str, value: str | None = None, what: str = "") -> str:
        if not self.peek(kind, value):
            found = f"found {self.tokens[self.i][1]!r}" if self.i < len(self.tokens) else "found the end"
            self.fail(f"expected {what or repr(value) or kind}, {found}", self.col())
        self.i += 1
        return self.tokens[self.i - 1][1]

    def skip(self, value: str) -> bool:
        if self.peek("op", value):
            self.i += 1
            return True
        return False

    def expression(self) -> Expression:
        if not self.tokens:
            self.fail("empty expression", 0)
        clauses = [self.clause()]
        while self.skip(";"):
            clauses.append(self.clause())
        return Expression(self.text, tuple(clauses), self.what)

    def clause(self) -> Clause:
        terms = [self.term(self.sign())]
        while self.peek("op", "+") or self.peek("op", "-"):
            terms.append(self.term(self.sign()))
        schedule, gate = self.modifiers()
        if self.i < len(self.tokens) and not self.peek("op", ";"):
            self.fail(f"expected '+', '-', '@' or ';' after a term, found {self.tokens[self.i][1]!r}", self.col())
        return Clause(tuple(terms), schedule, gate)

    def sign(self) -> float:
        if self.skip("-"):
            return -1.0
        self.skip("+")
        return 1.0

    def term(self, sign: float) -> Term:
        col = self.col()
        if self.skip("!"):
            if sign < 0:
                self.fail("an ablation '!name' takes no sign", col)
            name_col = self.col()
            name = self.take("name", what="a vector name after '!'")
            target: float | str = 0.0
            if self.skip("="):
                target = "mean" if self.peek("name", "mean") and self.take("name") else self.signed("a value after '='")
            return Term(name, 1.0, self.layers(), "ablate", target=target, columns=(name_col,))
        coefs = []
        if self.peek("num"):
            coefs.append(float(self.take("num")))
            self.skip("*")
        if self.peek("op", "!"):
            self.fail("an ablation '!name' takes no coefficient", self.col())
        columns = [self.col()]
        name = self.take("name", what="a vector name")
        removed = []
        while self.skip("|"):
            columns.append(self.col())
            removed.append(self.take("name", what="a vector name after '|'"))
        if self.peek("op", "["):
            if coefs or sign < 0 or removed:
                self.fail("a clamp 'name[low,high]' takes no sign, coefficient or '|'", col)
            bounds = self.bounds()
            return Term(name, 1.0, self.layers(), "clamp", bounds=bounds, columns=tuple(columns))
        if self.skip("*"):
            coefs.append(float(self.take("num", what="a coefficient after '*'")))
        elif self.skip(":"):
            coefs.append(self.signed("a coefficient after ':'"))
        if len(coefs) > 1:
            self.fail(f"the coefficient of {name!r} is given twice", col)
        return Term(name, sign * (coefs[0] if coefs else 1.0), self.layers(), removed=tuple(removed),
                    columns=tuple(columns))

    def signed(self, what: str) -> float:
        s = self.sign()
        return s * float(self.take("num", what=what))

    def bounds(self) -> tuple[float, float]:
        col = self.col()
        self.take("op", "[")
        low = float("-inf") if self.peek("op", ",") else self.signed("a lower bound")
        self.take("op", ",", "',' between the bounds")
        high = float("inf") if self.peek("op", "]") else self.signed("an upper bound")
        self.take("op", "]", "']' after the bounds")
        if low > high:
            self.fail(f"the clamp's bounds [{low:g},{high:g}] run backwards", col)
        return low, high

    def layers(self) -> tuple[int, ...] | None:
        """``@12-16,18`` after a term (an ``@`` before a number; ``@name`` is a modifier)."""
        if not (self.peek("op", "@") and self.peek("num", ahead=1)):
            return None
        self.i += 1
        out: list[int] = []
        while True:
            first = last = self.integer("a layer number")
            if self.peek("op", "-") and self.glued():
                self.i += 1
                last = self.integer("a layer number")
            if last < first:
                self.fail(f"layer range {first}-{last} runs backwards", self.tokens[self.i - 1][2])
            out.extend(range(first, last + 1))
            if not self.skip(","):
                return tuple(sorted(set(out)))

    def glued(self) -> bool:
        """The current token touches the ones on both sides (``12-16``, not ``12 - x``)."""
        if not 0 < self.i < len(self.tokens) - 1:
            return False
        (_, before, at0), (_, op, at1), (_, _, at2) = self.tokens[self.i - 1:self.i + 2]
        return at0 + len(before) == at1 and at1 + len(op) == at2

    def integer(self, what: str) -> int:
        col = self.col()
        text = self.take("num", what=what)
        if not text.isdigit():
            self.fail(f"{text!r} is not a whole number", col)
        return int(text)

    def modifiers(self) -> tuple[Schedule, Gate | None]:
        phase = first = after = gate = None
        while self.peek("op", "@"):
            col = self.col()
            self.i += 1
            word_col = self.col()
            word = self.take("name", what="prompt, response, first:N, after:N or when:probe>x")
            if word not in MODIFIERS:
                self.fail(f"unknown modifier '@{word}' (use @prompt, @response, @first:N, @after:N, "
                          f"@when:probe>x)", word_col)
            seen = {"prompt": phase, "response": phase, "first": first, "after": after, "when": gate}[word]
            if seen is not None:
                self.fail(f"'@{word}' conflicts with an earlier modifier of this clause", col)
            if word in ("prompt", "response"):
                phase = word
            elif word == "when":
                self.take("op", ":", "':' after @when")
                probe_col = self.col()
                probe = self.take("name", what="a probe vector's name")
                if not (self.peek("op", ">") or self.peek("op", "<")):
                    self.fail("expected '>' or '<' after the probe's name", self.col())
                above = self.take("op") == ">"
                gate = Gate(probe, above, self.signed("a threshold"), probe_col)
            else:
                self.take("op", ":", f"':' after @{word}")
                n = self.integer("a number of steps")
                if word == "first":
                    first = n
                else:
                    after = n
        if phase == "prompt" and (first is not None or after is not None or gate is not None):
            self.fail("@prompt is the prefill only: it takes no window or gate")
        return Schedule(phase, first, after), gate


def _num(value: float | str, infinite: str = "inf") -> str:
    if isinstance(value, str):
        return value
    return infinite if abs(value) == float("inf") else f"{value:g}"


Means = Callable[[str, SteeringVector], Mapping[int, float]]
"""``means(name, vector)``: the vector's stored projection means per layer (measured once
per vector and model; see ``steering.means``), for ``!name=mean``."""


def entries(expression: Expression, vectors: Mapping[str, SteeringVector], model: ModelIdentity,
            means: Means | None = None) -> list[tuple[Clause, dict[str, MixEntry]]]:
    """Each clause with its mix entries (name -> ``MixEntry``, named by the term's ``key``;
    a repeated key gets ``#2``, ``#3``), every name looked up in ``vectors`` and checked to
    be for ``model``. ``BadArgumentError`` naming the column of an unknown vector, one of
    another model, a layer it lacks or a zero direction it cannot ablate or clamp."""
    out, used = [], set()
    for clause in expression.clauses:
        made = {}
        for term in clause.terms:
            entry = _entry(expression, term, vectors, model, means)
            key, n = term.key, 2
            while key in used:
                key, n = f"{term.key}#{n}", n + 1
            used.add(key)
            made[key] = replace(entry, schedule=clause.schedule)
        out.append((clause, made))
    return out


def lookup(expression: Expression, name: str, column: int, vectors: Mapping[str, SteeringVector],
           model: ModelIdentity) -> SteeringVector:
    """``vectors[name]`` for ``model``, or ``BadArgumentError`` at ``column``."""
    if name not in vectors:
        known = sorted(vectors)
        listed = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "") if known else "none"
        fail_at(expression, f"unknown vector {name!r}{did_you_mean(name, known)} (the library has "
                          f"{listed})", column)
    vector = vectors[name]
    if vector.model != model:
        fail_at(expression, f"vector {name!r} was made for {vector.model.describe()}, not "
                          f"{model.describe()}", column)
    return vector


def _entry(expression: Expression, term: Term, vectors: Mapping[str, SteeringVector],
           model: ModelIdentity, means: Means | None) -> MixEntry:
    vector = lookup(expression, term.name, term.column, vectors, model)
    for other, column in zip(term.removed, term.columns[1:]):
        vector = _remove(vector, lookup(expression, other, column, vectors, model), term.operand)
    if term.layers is not None:
        beyond = [l for l in term.layers if l >= model.num_layers]
        if beyond:
            fail_at(expression, f"layer(s) {beyond} out of range; the model has layers "
                                f"0..{model.num_layers - 1}", term.column)
        missing = [l for l in term.layers if l not in vector.directions]
        if missing:
            fail_at(expression, f"vector {term.operand!r} has no layer(s) {missing}; it has "
                              f"{list(vector.layers)}", term.column)
    if term.op != "add":
        chosen = vector.select(term.layers) if term.layers is not None else vector
        zero = [l for l, n in chosen.norms().items() if n == 0]
        if zero:
            fail_at(expression, f"vector {term.name!r} is zero at layer(s) {zero}: nothing to {term.op}",
                  term.column)
    target = term.target
    if target == "mean":
        if means is None:
            fail_at(expression, "'=mean' needs stored means, which only a Session measures", term.column)
        target = dict(means(term.name, vector))
    return MixEntry(vector, term.coef, term.layers, term.op, target, term.bounds)


def _remove(a: SteeringVector, b: SteeringVector, label: str) -> SteeringVector:
    """``a`` with its component along ``b`` removed at every layer both have (``a|b``)."""
    out = {}
    for layer, d in a.directions.items():
        u = b.directions.get(layer)
        n = float(u.norm()) if u is not None else 0.0
        out[layer] = d - (d @ u) / n ** 2 * u if n > 0 else d
    return SteeringVector(out, a.model, label)


def render(mix_entries: Mapping[str, MixEntry]) -> str:
    """``mix_entries`` written as an expression (a clause per schedule); parsing it and
    resolving its names gives the same entries where each name is the library's vector
    (a saved mix is its expression)."""
    clauses: dict[Schedule, list[Term]] = {}
    for key, e in mix_entries.items():
        text = key.split("#")[0]
        name, *removed = text.lstrip("!").split("[")[0].split("=")[0].split("|")
        target = e.target if not isinstance(e.target, Mapping) else "mean"
        clauses.setdefault(e.schedule, []).append(
            Term(name, e.coef, e.layers, e.op, tuple(removed), target, e.bounds))
    return "; ".join(str(Clause(tuple(terms), schedule)) for schedule, terms in clauses.items())


def fail_at(expression: Expression, problem: str, column: int):
    """``BadArgumentError`` about ``expression``: ``problem`` at ``column`` (0-based)."""
    raise BadArgumentError(f"{expression.what} {expression.text!r}: {problem} at column {column + 1}; "
                           f"write e.g. {EXAMPLE} (docs/steering.md).")
