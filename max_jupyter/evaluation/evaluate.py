"""``evaluate``: does a vector put its concept into the text, keep the text fluent and on
the prompt, and beat asking for the concept in the prompt? (``Session.evaluate``.)

The prompts are split in two (even places: ``eval``, odd: ``test``). Every prompt is
generated with the vector at each coefficient, with no steering, and with the concept
asked for in a system line (prompting); each condition runs as one batch
(``Session.generate_batch``) and is scored at once by the reader (``evaluation.scores``).
The coefficient with the best mean harmonic score on the eval split is chosen; then the
test prompts are generated with a random vector of the vector's per-layer norms and with
the vector negated, both at that coefficient. Numbers are reported on the test split
(``Evaluation.summary``). Ctrl-C ends it with the conditions finished so far.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from max_jupyter.errors import BadArgumentError
from max_jupyter.evaluation.result import EvalRow, Evaluation
from max_jupyter.evaluation.scores import DISTRACTORS, Answer, fluency_scale, score_answers
from max_jupyter.orchestrator.options import GenerationOptions, merge_options
from max_jupyter.steering.concepts import concept, is_concept
from max_jupyter.steering.mix import Mix
from max_jupyter.steering.vector import SteeringVector
from max_jupyter.tokenizer import token_pieces
from max_jupyter.validation import check_coef, check_int, check_str_list, fail

DEFAULT_COEFS = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5)
"""The coefficients an evaluation tries unless given others (the readable scale: ~0.1
mild, ~0.5 clear, ~1.0 strong)."""
DEFAULT_PROMPTS = 20
DEFAULT_TOKENS = 48
MAX_COEFS = 25


def evaluate(session, vector: SteeringVector | str, *, concept_name: str | None = None,
             prompts: Sequence[str] | None = None, coefs: Sequence[float] | None = None,
             max_new_tokens: int = DEFAULT_TOKENS, options: GenerationOptions | None = None,
             seed: int = 0, progress: bool = True) -> Evaluation:
    """Evaluate ``vector`` (a ``SteeringVector``, a library concept's name or a library
    vector's name) for ``concept_name`` (default: the vector's name or label when it is a
    concept) on ``prompts`` (default: the concept's first ``DEFAULT_PROMPTS``) at ``coefs``
    (default ``DEFAULT_COEFS``); see the module. Everything is checked before any forward."""
    name = _concept_name(session, vector, concept_name)
    found = concept(name)
    prompts = list(check_str_list("prompts", found.prompts[:DEFAULT_PROMPTS] if prompts is None else prompts,
                                  allow_empty_list=False))
    if len(prompts) < 2 * (DISTRACTORS + 1):
        raise fail("prompts", prompts, f"holds {len(prompts)} prompts", f"give at least "
                   f"{2 * (DISTRACTORS + 1)} (two splits, and other prompts to compare each with)")
    coefs = _coefs(coefs)
    options = merge_options(options, session.defaults, {"max_new_tokens": check_int(
        "max_new_tokens", max_new_tokens, low=1, fix="use a whole number >= 1 such as 48")})
    seed = check_int("seed", seed, low=0, fix="use a whole number >= 0")
    target = session.vector(vector, progress=progress) if isinstance(vector, str) else vector  # may train a concept
    for coef in coefs:  # a coefficient past the mix's bound is refused before any generation
        _mix(session, target, coef)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    reader = session.reader
    probe = session.probe(name)
    scale = session.run(lambda s: fluency_scale(reader, [*found.scoring_positive, *found.scoring_negative], seed))
    ev = Evaluation(name, target.label, prompts, coefs, probe.auroc, scale, reader.identity.describe())
    chats = [reader.tokenizer.chat(p) for p in prompts]
    everyone, test = range(len(prompts)), range(1, len(prompts), 2)
    total = (len(coefs) + 2) * len(prompts) + 2 * len(test)
    bar = tqdm(total=total, desc=f"evaluating {target.label}", unit="answer", disable=not progress)

    def run(condition: str, coef: float, steering: SteeringVector | None, rows: Sequence[int]) -> None:
        mix = None if steering is None else _mix(session, steering, coef)
        opts = options.replace(system=found.system) if condition == "prompting" else options
        clock = time.perf_counter()
        results = session.generate_batch([prompts[i] for i in rows], steering=mix, options=opts, progress=False)
        ev.generation_s += time.perf_counter() - clock
        if any(r.finish_reason == "interrupted" for r in results):
            raise KeyboardInterrupt  # generate_batch returns on Ctrl-C: this condition is unfinished
        answers = [Answer(chats[i], list(r.token_ids), token_pieces(session.big.tokenizer, r.token_ids),
                          [chats[(i + d) % len(prompts)] for d in range(1, DISTRACTORS + 1)])
                   for i, r in zip(rows, results)]
        clock = time.perf_counter()
        scores = session.run(lambda s: score_answers(reader, probe, scale, answers))
        ev.scoring_s += time.perf_counter() - clock
        ev.rows += [EvalRow(condition, coef, prompts[i], "eval" if i % 2 == 0 else "test", r.text,
                            len(r.token_ids), sc) for i, r, sc in zip(rows, results, scores)]
        bar.update(len(rows))

    try:
        for coef in coefs:
            run("steered", coef, target, everyone)
        run("none", 0.0, None, everyone)
        run("prompting", 0.0, None, everyone)
        chosen = ev.chosen_coef
        run("random", chosen, random_control(target, seed), test)
        run("flipped", -chosen, target, test)
    except KeyboardInterrupt:
        ev.interrupted = True
    finally:
        bar.close()
        ev.elapsed_s = time.perf_counter() - start
    return ev


def _mix(session, vector: SteeringVector, coef: float) -> Mix:
    """``vector`` at ``coef`` as a mix for the big model (checked as every mix is)."""
    mix = Mix(session.big.identity)
    mix.set(vector.label or "vector", vector, coef)
    return mix


def random_control(vector: SteeringVector, seed: int = 0) -> SteeringVector:
    """A random vector with ``vector``'s layers and per-layer norms (Gaussian directions from
    ``seed``): the control a trained direction must beat."""
    gen = torch.Generator().manual_seed(seed)
    directions = {}
    for layer, d in vector.directions.items():
        r = torch.randn(d.shape, generator=gen)
        directions[layer] = r * (d.norm() / r.norm())
    return SteeringVector(directions, vector.model, f"random({vector.label})")


def _concept_name(session, vector: SteeringVector | str, concept_name: str | None) -> str:
    """The concept ``vector`` is evaluated for, checked (nothing is trained or read)."""
    if isinstance(vector, str):
        if not is_concept(vector) and vector not in session.vectors:
            session.vector(vector)  # raises: the library has no such vector
        label = vector
    elif isinstance(vector, SteeringVector):
        vector.check_model(session.big.identity)
        label = vector.label
    else:
        raise fail("vector", vector, f"is a {type(vector).__name__}", "give a SteeringVector, a "
                   "library concept's name (e.g. 'joy') or a library vector's name")
    name = concept_name if concept_name is not None else label
    if not is_concept(name):
        raise BadArgumentError(f"concept={concept_name!r}: the vector {label!r} is not a library "
                               f"concept; name the concept it should carry, e.g. concept='joy' "
                               f"(%max_steer concepts lists them).")
    return name


def _coefs(coefs: Sequence[float] | None) -> list[float]:
    if coefs is None:
        return list(DEFAULT_COEFS)
    if isinstance(coefs, (str, bytes)) or not isinstance(coefs, Sequence) or not 0 < len(coefs) <= MAX_COEFS:
        raise fail("coefs", coefs, "is not a list of 1 to 25 coefficients", "give e.g. [0.1, 0.5, 1.0]")
    out = [check_coef(f"coefs[{i}]", c) for i, c in enumerate(coefs)]
    if any(c == 0 or not math.isfinite(c) for c in out):
        raise fail("coefs", list(coefs), "holds 0", "leave 0 out: no steering is a baseline already")
    return out
