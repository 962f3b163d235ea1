"""The three 0-2 scores of one generated answer, read by an unsteered model (the reader),
and their harmonic mean (AxBench's combination: one score near 0 pulls the whole down).

- **concept**: 2 x the concept probe's P(concept) of the answer (``steering.probe``: fitted
  on the concept's labelled scoring texts, its held-out AUROC reported with it).
- **fluency**: the reader's perplexity of the answer after its prompt, placed on a log
  scale between fluent reference text (2) and the same text with its words shuffled (0)
  (``FluencyScale``, measured on the reader per concept), times ``1 - degeneracy /
  COLLAPSED`` (``evaluation.degeneracy``), so a collapsed answer scores 0 however likely
  its loops are.
- **relevance** (instruction relevance): does the answer address its prompt? The reader's
  likelihood of the answer's first ``RELEVANCE_TOKENS`` tokens after its own prompt and
  after ``DISTRACTORS`` other prompts of the evaluation gives a posterior over which prompt
  it answers (uniform prior); relevance is that posterior for its own prompt, rescaled so
  chance (an answer that fits any prompt as well) is 0 and certainty 2.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from max_jupyter.engines.base import Engine
from max_jupyter.evaluation.degeneracy import COLLAPSED, Degeneracy, degeneracy
from max_jupyter.steering.probe import CONTEXT, ConceptProbe
from max_jupyter.steering.reading import read_rows, token_nll

RELEVANCE_TOKENS = 64
"""Answer tokens the relevance compares prompts on: the whole answer at the evaluation's
lengths (up to 64 tokens, which bounds the distractor reads). An opening alone misreads
chat answers that begin with a generic disclaimer ("As an AI language model, I don't have
a physical presence, so..."): at 16 tokens such an answer scored about chance although
its next words named the prompt's subject (docs/evaluation.md)."""
DISTRACTORS = 2
"""Other prompts each answer is also read after, for relevance."""


@dataclass(frozen=True)
class FluencyScale:
    """Perplexities of the reader that fluency is placed between: ``fluent`` (the median of
    fluent reference texts read as answers: fluency 2 at or below it) and ``broken`` (the
    same texts with their words shuffled: fluency 0 at or above it)."""

    fluent: float
    broken: float

    def score(self, perplexity: float, collapse: Degeneracy) -> float:
        if not math.isfinite(perplexity):
            return 0.0
        span = math.log(self.broken) - math.log(self.fluent)
        place = (math.log(self.broken) - math.log(perplexity)) / span if span > 0 else 0.0
        return 2.0 * _clip(place) * (1.0 - _clip(collapse.score / COLLAPSED))


@dataclass(frozen=True)
class AnswerScores:
    """One answer's scores (each 0-2) and what they were computed from."""

    concept: float
    fluency: float
    relevance: float
    perplexity: float
    degeneracy: Degeneracy

    @property
    def harmonic(self) -> float:
        return harmonic_mean((self.concept, self.fluency, self.relevance))


@dataclass(frozen=True)
class Answer:
    """An answer to score: its prompt's reader ids, the answer's reader ids, the pieces of
    its text as generated (for degeneracy) and its distractor prompts' reader ids."""

    prompt_ids: list[int]
    ids: list[int]
    pieces: list[str]
    distractor_ids: list[list[int]]


def harmonic_mean(scores: Sequence[float]) -> float:
    """The harmonic mean of non-negative ``scores``; 0 if any is 0."""
    return 0.0 if min(scores) <= 0 else len(scores) / sum(1.0 / s for s in scores)


def relevance(own: float, others: Sequence[float]) -> float:
    """From the summed negative log-likelihoods of an answer after its own prompt (``own``)
    and after ``others``: 2 x the own prompt's posterior, rescaled from chance (0) to 1 (2)."""
    nll = torch.tensor([own, *others], dtype=torch.float64)
    posterior = float(torch.softmax(-nll, 0)[0])
    chance = 1.0 / len(nll)
    return 2.0 * _clip((posterior - chance) / (1.0 - chance))


def fluency_scale(engine: Engine, texts: Sequence[str], seed: int = 0) -> FluencyScale:
    """The reader's ``FluencyScale`` from fluent ``texts`` (and their words shuffled with
    ``seed``), each read as the answer to ``CONTEXT``. Side effect: empties its caches."""
    rng = random.Random(seed)
    shuffled = []
    for text in texts:
        words = text.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    return FluencyScale(_median_perplexity(engine, texts), _median_perplexity(engine, shuffled))


def _median_perplexity(engine: Engine, texts: Sequence[str]) -> float:
    context = engine.tokenizer.chat(CONTEXT)
    rows = [context + engine.tokenizer.encode(t) for t in texts]
    last = engine.identity.num_layers - 1
    ppl = [math.exp(float(token_nll(engine, states[last], row, len(context)).mean()))
           for row, states in zip(rows, read_rows(engine, rows, [last]))]
    return statistics.median(ppl)


def score_answers(engine: Engine, probe: ConceptProbe, scale: FluencyScale,
                  answers: Sequence[Answer]) -> list[AnswerScores]:
    """Score each answer with ``engine`` (the reader, unsteered; the probe's model): one
    read of prompt + answer (concept, perplexity, own likelihood) and one per distractor
    prompt + the answer's opening. Side effect: empties the engine's caches."""
    last = engine.identity.num_layers - 1
    rows = []
    for a in answers:
        if a.ids:
            rows.append(a.prompt_ids + a.ids)
            rows += [d + a.ids[:RELEVANCE_TOKENS] for d in a.distractor_ids]
    states = iter(read_rows(engine, rows, [last, probe.layer]))
    out = []
    for a in answers:
        collapse = degeneracy(a.pieces)
        if not a.ids:  # nothing to read: nothing of the concept, the prompt or fluent text
            out.append(AnswerScores(0.0, 0.0, 0.0, math.nan, collapse))
            continue
        own = next(states)
        nll = token_nll(engine, own[last], a.prompt_ids + a.ids, len(a.prompt_ids))
        others = [float(token_nll(engine, next(states)[last], d + a.ids[:RELEVANCE_TOKENS], len(d)).sum())
                  for d in a.distractor_ids]
        perplexity = math.exp(float(nll.mean()))
        concept = 2.0 * float(probe.probability(own[probe.layer][len(a.prompt_ids):].mean(0, keepdim=True))[0])
        out.append(AnswerScores(concept, scale.score(perplexity, collapse),
                                relevance(float(nll[:RELEVANCE_TOKENS].sum()), others), perplexity, collapse))
    return out


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))
