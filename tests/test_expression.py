"""The steering expression language (steering/expression.py): every construct, its
canonical text, every error with its column, names resolved into mix entries."""
from __future__ import annotations

import pytest
import torch

from max_jupyter.errors import BadArgumentError
from max_jupyter.steering import Mix, SteeringVector
from max_jupyter.steering.expression import entries, parse, parse_layers, render
from max_jupyter.steering.mix import ALWAYS, Schedule
from max_jupyter.testing import ScriptedEngine


@pytest.mark.parametrize("text,canonical", [
    ("joy", "1*joy"),
    ("0.3 joy - 0.2 verbose", "0.3*joy - 0.2*verbose"),
    ("joy:0.8", "0.8*joy"),
    ("0.5*joy - 0.3*formal@12-13", "0.5*joy - 0.3*formal@12,13"),
    ("-joy + joy*2@3,5-6", "- 1*joy + 2*joy@3,5,6"),
    ("joy:-0.25", "- 0.25*joy"),
    ("0.3 joy|verbose", "0.3*joy|verbose"),
    ("0.3 a|b|c@4", "0.3*a|b|c@4"),
    ("!refusal", "!refusal"),
    ("!refusal=mean", "!refusal=mean"),
    ("!refusal=-1.5@3", "!refusal=-1.5@3"),
    ("verbose[-1,2]", "verbose[-1,2]"),
    ("verbose[,2]@4", "verbose[,2]@4"),
    ("verbose[0.5,]", "verbose[0.5,]"),
    ("0.3 joy @response", "0.3*joy @response"),
    ("0.3 joy @prompt", "0.3*joy @prompt"),
    ("joy @first:4", "1*joy @first:4"),
    ("joy @after:2 @first:9", "1*joy @first:9 @after:2"),
    ("joy @response @when:happy>0.4", "1*joy @response @when:happy>0.4"),
    ("joy @when:calm.v1<-2", "1*joy @when:calm.v1<-2"),
    ("0.3 joy - 0.2 verbose @response; !refusal; 2 joy @first:3",
     "0.3*joy - 0.2*verbose @response; !refusal; 2*joy @first:3"),
    ("a.b/c:1e-1", "0.1*a.b/c"),
])
def test_every_construct_parses_to_its_canonical_text(text, canonical):
    expression = parse(text)
    assert str(expression) == canonical
    assert str(parse(canonical)) == canonical  # the canonical text reads back the same


def test_the_parts_of_a_clause():
    (first, second) = parse("0.3 joy|calm + !x @response @first:4 @when:p>1; verbose[-1,2]@3").clauses
    joy, x = first.terms
    assert (joy.name, joy.coef, joy.removed, joy.op) == ("joy", 0.3, ("calm",), "add")
    assert (x.name, x.op, x.target) == ("x", "ablate", 0.0)
    assert first.schedule == Schedule("response", 4, None)
    assert (first.gate.probe, first.gate.above, first.gate.threshold) == ("p", True, 1.0)
    (clamp,) = second.terms
    assert (clamp.op, clamp.bounds, clamp.layers, second.schedule) == ("clamp", (-1.0, 2.0), (3,), ALWAYS)
    assert parse_layers("10,12-14") == (10, 12, 13, 14)


@pytest.mark.parametrize("text,problem,column", [
    ("", "empty expression", 1),
    ("   ", "empty expression", 1),
    ("joy joy", "after a term, found 'joy'", 5),
    ("j#oy", "unexpected '#'", 2),
    ("joy:", "expected a coefficient after ':'", 5),
    ("0.5*joy:2", "given twice", 1),
    ("joy@16-12", "runs backwards", 8),
    ("joy@1.5", "'1.5' is not a whole number", 5),
    ("- !x", "an ablation '!name' takes no sign", 3),
    ("0.3 !x", "an ablation '!name' takes no coefficient", 5),
    ("!3", "expected a vector name after '!'", 2),
    ("!x=", "expected a value after '='", 4),
    ("x[3,1]", "bounds [3,1] run backwards", 2),
    ("2 x[0,1]", "a clamp 'name[low,high]' takes no sign", 1),
    ("x[0 1]", "expected ',' between the bounds", 5),
    ("x[0,1", "expected ']' after the bounds", 6),
    ("a|", "expected a vector name after '|'", 3),
    ("joy @nope", "unknown modifier '@nope'", 6),
    ("joy @", "expected prompt, response", 6),
    ("joy @response @prompt", "'@prompt' conflicts", 15),
    ("joy @first:2 @first:3", "'@first' conflicts", 14),
    ("joy @first:x", "expected a number of steps", 12),
    ("joy @first:2.5", "'2.5' is not a whole number", 12),
    ("joy @after 3", "expected ':' after @after", 12),
    ("joy @when:p=3", "expected '>' or '<' after the probe's name", 12),
    ("joy @when:p>", "expected a threshold", 13),
    ("joy @when:>1", "expected a probe vector's name", 11),
    ("joy @prompt @first:2", "@prompt is the prefill only", 21),
    ("joy;", "expected a vector name, found the end", 5),
    ("joy @response joy", "after a term, found 'joy'", 15),
])
def test_every_error_names_its_column(text, problem, column):
    with pytest.raises(BadArgumentError) as e:
        parse(text)
    message = str(e.value)
    assert problem in message and f"at column {column};" in message, message
    assert "\n" not in message and message.startswith(f"steering {text!r}:")


@pytest.fixture(scope="module")
def library():
    engine = ScriptedEngine(num_layers=8)
    g = torch.Generator().manual_seed(0)

    def vec(label, layers):
        return SteeringVector({l: torch.randn(engine.identity.hidden_size, generator=g) for l in layers},
                              engine.identity, label)
    vectors = {"joy": vec("joy", [2, 3, 4]), "calm": vec("calm", [3, 4]), "zero": SteeringVector(
        {3: torch.zeros(engine.identity.hidden_size)}, engine.identity, "zero")}
    other = ScriptedEngine(num_layers=4).identity
    vectors["elsewhere"] = SteeringVector({1: torch.ones(other.hidden_size)}, other, "elsewhere")
    return engine.identity, vectors


def test_names_resolve_to_entries(library):
    model, vectors = library
    [(clause, made)] = entries(parse("0.5 joy|calm@3 + !calm + joy[-1,1] - 0.5 joy @response"), vectors, model)
    assert list(made) == ["joy|calm", "!calm", "joy[-1,1]", "joy"]
    removed = made["joy|calm"].vector.directions[3]
    assert abs(float(removed @ vectors["calm"].directions[3])) < 1e-3  # a|b: b's component gone
    torch.testing.assert_close(made["joy|calm"].vector.directions[2], vectors["joy"].directions[2])
    assert made["!calm"].op == "ablate" and made["joy[-1,1]"].bounds == (-1.0, 1.0)
    assert all(e.schedule == Schedule("response") for e in made.values())
    mix = Mix(model)
    mix.assign(made)
    assert render(mix.entries) == "0.5*joy|calm@3 + !calm + joy[-1,1] - 0.5*joy @response"


@pytest.mark.parametrize("text,problem,column", [
    ("0.3 joy + 0.2 sad", "unknown vector 'sad'", 15),
    ("0.3 joi", "unknown vector 'joi' (did you mean 'joy'?)", 5),
    ("joy|sad", "unknown vector 'sad'", 5),
    ("joy + elsewhere", "vector 'elsewhere' was made for", 7),
    ("calm@2", "vector 'calm' has no layer(s) [2]", 1),
    ("calm@8", "layer(s) [8] out of range; the model has layers 0..7", 1),
    ("!zero", "vector 'zero' is zero at layer(s) [3]", 2),
    ("joy; !joy=mean", "'=mean' needs stored means", 7),
])
def test_resolution_errors_name_the_column(library, text, problem, column):
    model, vectors = library
    with pytest.raises(BadArgumentError) as e:
        entries(parse(text), vectors, model)
    assert problem in str(e.value) and f"at column {column};" in str(e.value), str(e.value)
