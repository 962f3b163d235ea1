"""``--steer`` specs: vector arithmetic on named vectors, e.g. ``joy:0.8`` or
``"0.5*joy - 0.3*formal@12-16"``.

Grammar (spaces are free)::

    spec   := [sign] term (sign term)*          sign := "+" | "-"
    term   := [NUMBER "*"] NAME ["*" NUMBER | ":" [sign] NUMBER] ["@" layers]
    layers := span ("," span)*                  span := INT ["-" INT]   (inclusive, no spaces)

A term's coefficient is given at most once (``0.5*joy``, ``joy*0.5`` or ``joy:0.5``; none
means 1) and is multiplied by the sign before it. ``NAME`` starts with a letter or ``_``
and holds letters, digits, ``_``, ``.`` and ``/``. ``parse_spec`` only parses; resolving
names against a vector library is ``spec_mix``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.errors import BadArgumentError, did_you_mean
from max_jupyter.steering.mix import Mix
from max_jupyter.steering.vector import SteeringVector

_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                    r"|(?P<name>[A-Za-z_][\w./]*)|(?P<op>[-+*:@,]))")


@dataclass(frozen=True)
class SteerTerm:
    """``coef * vectors[name]`` restricted to ``layers`` (None: the vector's own layers)."""

    name: str
    coef: float
    layers: tuple[int, ...] | None = None

    def __str__(self) -> str:
        at = f"@{','.join(map(str, self.layers))}" if self.layers is not None else ""
        return f"{self.coef:g}*{self.name}{at}"


class _Parser:
    """Recursive-descent parser over the tokens of one spec; errors name the column."""

    def __init__(self, spec: str):
        self.spec, self.tokens, pos = spec, [], 0
        while spec[pos:].strip():
            m = _TOKEN.match(spec, pos)
            if not m:
                col = len(spec) - len(spec[pos:].lstrip())
                self.fail(f"unexpected {spec[col]!r}", col)
            kind = m.lastgroup
            self.tokens.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0

    def fail(self, what: str, col: int | None = None) -> None:
        col = len(self.spec) if col is None else col
        raise BadArgumentError(f"--steer {self.spec!r}: {what} at column {col + 1}; write e.g. "
                               f"'joy:0.8' or '0.5*joy - 0.3*formal@12-16'.")

    def peek(self, kind: str | None = None, value: str | None = None) -> bool:
        if self.i >= len(self.tokens):
            return False
        k, v, _ = self.tokens[self.i]
        return (kind is None or k == kind) and (value is None or v == value)

    def take(self, kind: str, value: str | None = None, what: str = "") -> str:
        if not self.peek(kind, value):
            found = (f"found {self.tokens[self.i][1]!r}" if self.i < len(self.tokens)
                     else "found the end")
            self.fail(f"expected {what or value or kind}, {found}",
                      self.tokens[self.i][2] if self.i < len(self.tokens) else None)
        self.i += 1
        return self.tokens[self.i - 1][1]

    def sign(self) -> float:
        if self.peek("op", "-"):
            self.i += 1
            return -1.0
        if self.peek("op", "+"):
            self.i += 1
        return 1.0

    def spec_terms(self) -> list[SteerTerm]:
        if not self.tokens:
            self.fail("empty spec", 0)
        terms = [self.term(self.sign())]
        while self.i < len(self.tokens):
            if not (self.peek("op", "+") or self.peek("op", "-")):
                self.fail(f"expected '+' or '-' between terms, found {self.tokens[self.i][1]!r}",
                          self.tokens[self.i][2])
            terms.append(self.term(self.sign()))
        return terms

    def term(self, sign: float) -> SteerTerm:
        coefs = []
        if self.peek("num"):
            coefs.append(float(self.take("num")))
            self.take("op", "*", "'*' after a coefficient")
        name = self.take("name", what="a vector name")
        if self.peek("op", "*"):
            self.i += 1
            coefs.append(float(self.take("num", what="a coefficient after '*'")))
        elif self.peek("op", ":"):
            self.i += 1
            s = self.sign()
            coefs.append(s * float(self.take("num", what="a coefficient after ':'")))
        if len(coefs) > 1:
            self.fail(f"the coefficient of {name!r} is given twice")
        layers = self.layers() if self.peek("op", "@") else None
        return SteerTerm(name, sign * (coefs[0] if coefs else 1.0), layers)

    def layers(self) -> tuple[int, ...]:
        self.take("op", "@")
        out: list[int] = []
        while True:
            first = self.integer()
            last = first
            if self.peek("op", "-") and self.glued():
                self.i += 1
                last = self.integer()
            if last < first:
                self.fail(f"layer range {first}-{last} runs backwards")
            out.extend(range(first, last + 1))
            if not self.peek("op", ","):
                return tuple(sorted(set(out)))
            self.i += 1

    def glued(self) -> bool:
        """The current token touches the ones on both sides (``12-16``, not ``12 - x``)."""
        if not 0 < self.i < len(self.tokens) - 1:
            return False
        (_, before, at0), (_, op, at1), (_, _, at2) = self.tokens[self.i - 1:self.i + 2]
        return at0 + len(before) == at1 and at1 + len(op) == at2

    def integer(self) -> int:
        col = self.tokens[self.i][2] if self.i < len(self.tokens) else None
        text = self.take("num", what="a layer number")
        if not text.isdigit():
            self.fail(f"layer {text!r} is not a whole number", col)
        return int(text)


def parse_spec(spec: str) -> list[SteerTerm]:
    """The terms of one ``--steer`` spec; ``BadArgumentError`` (one line) if malformed."""
    return _Parser(spec).spec_terms()


def parse_layers(text: str, what: str = "--layers") -> tuple[int, ...]:
    """Layers like ``12``, ``12-15`` or ``10,12-14`` (inclusive ranges), sorted, unique."""
    try:
        return _Parser("x@" + text).spec_terms()[0].layers
    except BadArgumentError:
        raise BadArgumentError(f"{what} {text!r}: write layers as 12, 12-15 or 10,12-14.") from None


def spec_mix(specs: Iterable[str | SteerTerm], vectors: Mapping[str, SteeringVector],
             model: ModelIdentity) -> Mix | None:
    """One mix for ``model`` from ``--steer`` specs (strings or parsed terms), each name
    looked up in ``vectors``; ``None`` when there are no terms. Raises ``BadArgumentError``
    for an unknown vector, a vector of another model or a layer it lacks."""
    terms = [t for s in specs for t in ([s] if isinstance(s, SteerTerm) else parse_spec(s))]
    if not terms:
        return None
    mix = Mix(model)
    for term in terms:
        vector = lookup_vector(vectors, term.name)
        if vector.model != model:
            raise BadArgumentError(f"vector {term.name!r} was made for {vector.model.describe()}, "
                                   f"not the big model {model.describe()}.")
        if term.layers is not None:
            bad = [l for l in term.layers if not 0 <= l < model.num_layers]
            if bad:
                raise BadArgumentError(f"--steer {term}: layer(s) {bad} out of range; the big "
                                       f"model has layers 0..{model.num_layers - 1}.")
            missing = [l for l in term.layers if l not in vector.directions]
            if missing:
                raise BadArgumentError(f"--steer {term}: vector {term.name!r} has no layer(s) "
                                       f"{missing}; it has {list(vector.layers)}.")
        key, n = term.name, 2
        while key in mix:
            key, n = f"{term.name}#{n}", n + 1
        mix.set(key, vector, term.coef, term.layers)
    return mix


def lookup_vector(vectors: Mapping[str, SteeringVector], name: str) -> SteeringVector:
    """``vectors[name]``, or ``BadArgumentError`` listing the names there are."""
    if name not in vectors:
        known = sorted(vectors)
        raise BadArgumentError(f"unknown vector {name!r}{did_you_mean(name, known)}; the library has "
                               f"{', '.join(known[:12]) + (' ...' if len(known) > 12 else '') if known else 'none'} "
                               f"(train one with %max_steer train, or list them with %max_steer list).")
    return vectors[name]
