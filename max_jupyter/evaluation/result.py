"""``Evaluation``: the rows of one evaluation of a vector (one scored answer each) and the
numbers read from them: means per condition and coefficient, the coefficient chosen on
the evaluation split, and the test split's numbers beside the baselines."""
from __future__ import annotations

import html
import math
import statistics
from dataclasses import dataclass, field

from max_jupyter.evaluation.scores import AnswerScores, FluencyScale

CONDITIONS = ("steered", "none", "prompting", "random", "flipped")
"""steered: the vector at a coefficient; none: no steering; prompting: the concept asked
for in a system line; random: a random vector with the vector's per-layer norms at the
chosen coefficient; flipped: the vector negated at the chosen coefficient."""
SCORES = ("concept", "fluency", "relevance", "harmonic")


@dataclass(frozen=True)
class EvalRow:
    """One generated answer: its condition, coefficient, prompt, split (``eval`` / ``test``),
    text, token count and scores."""

    condition: str
    coef: float
    prompt: str
    split: str
    text: str
    tokens: int
    scores: AnswerScores

    def values(self) -> dict[str, float]:
        s = self.scores
        return {"concept": s.concept, "fluency": s.fluency, "relevance": s.relevance,
                "harmonic": s.harmonic}


@dataclass
class Evaluation:
    """What ``Session.evaluate`` measured. ``rows``: every scored answer; ``probe_auroc``:
    the concept probe's held-out AUROC; ``fluency_scale``: the reader's reference
    perplexities; ``interrupted``: Ctrl-C ended it early (the rows are those finished);
    ``elapsed_s`` the whole run, of which ``generation_s`` generating and ``scoring_s``
    scoring the answers (the rest: fitting the probe, the references, a concept's vector)."""

    concept: str
    vector: str
    prompts: list[str]
    coefs: list[float]
    probe_auroc: float
    fluency_scale: FluencyScale
    reader: str
    rows: list[EvalRow] = field(default_factory=list)
    interrupted: bool = False
    elapsed_s: float = 0.0
    generation_s: float = 0.0
    scoring_s: float = 0.0

    def select(self, condition: str, coef: float | None = None, split: str | None = None) -> list[EvalRow]:
        return [r for r in self.rows if r.condition == condition and (coef is None or r.coef == coef)
                and (split is None or r.split == split)]

    def means(self, condition: str, coef: float | None = None, split: str | None = None) -> dict[str, float]:
        """Mean of each score (``SCORES``) over the matching rows (NaN where none), and ``n``."""
        rows = self.select(condition, coef, split)
        out = {k: statistics.fmean(r.values()[k] for r in rows) if rows else math.nan for k in SCORES}
        return {**out, "n": len(rows)}

    @property
    def chosen_coef(self) -> float | None:
        """The coefficient whose steered answers on the evaluation split have the best mean
        harmonic score (the smallest of equals); None before any is scored."""
        scored = [(self.means("steered", c, "eval")["harmonic"], -c, c) for c in self.coefs
                  if self.select("steered", c, "eval")]
        return max(scored)[2] if scored else None

    def table(self) -> list[dict]:
        """One dict per (condition, coefficient, split) that has rows: those keys, ``n`` and
        the mean scores."""
        seen = dict.fromkeys((r.condition, r.coef, r.split) for r in self.rows)
        return [{"condition": c, "coef": k, "split": s, **self.means(c, k, s)} for c, k, s in seen]

    def summary(self) -> dict[str, float]:
        """The test split's mean harmonic score of the vector at the chosen coefficient and
        of each baseline, the chosen coefficient and the probe's held-out AUROC."""
        chosen = self.chosen_coef
        at = {"steered": chosen, "random": chosen, "flipped": None if chosen is None else -chosen}
        test = {c: self.means(c, at.get(c), "test") for c in CONDITIONS}
        return {"concept": self.concept, "chosen_coef": chosen, "probe_auroc": self.probe_auroc,
                **{f"{c}_harmonic": test[c]["harmonic"] for c in CONDITIONS},
                **{f"{c}_concept": test[c]["concept"] for c in CONDITIONS}}

    def to_pandas(self):
        """The rows as a ``pandas.DataFrame`` (needs pandas): condition, coef, split, prompt,
        text, tokens, the four scores, perplexity, degeneracy."""
        import pandas as pd

        return pd.DataFrame([{"condition": r.condition, "coef": r.coef, "split": r.split,
                              "prompt": r.prompt, "text": r.text, "tokens": r.tokens, **r.values(),
                              "perplexity": r.scores.perplexity, "degeneracy": r.scores.degeneracy.score}
                             for r in self.rows])

    def _repr_html_(self) -> str:
        chosen = self.chosen_coef
        head = "".join(f"<th>{h}</th>" for h in ("condition", "coef", "split", "n", *SCORES))
        body = "".join(self._html_row(t, chosen) for t in self.table())
        s = self.summary()
        verdict = (f"test split, harmonic mean: vector at {chosen:+g} <b>{s['steered_harmonic']:.2f}</b>, "
                   f"prompting {s['prompting_harmonic']:.2f}, no steering {s['none_harmonic']:.2f}, "
                   f"random {s['random_harmonic']:.2f}, flipped {s['flipped_harmonic']:.2f}"
                   if chosen is not None else "nothing scored yet")
        return (f"<div><b>evaluation of {html.escape(self.vector)}</b> for concept "
                f"<i>{html.escape(self.concept)}</i> ({len(self.prompts)} prompts, read by "
                f"{html.escape(self.reader)}; probe held-out AUROC {self.probe_auroc:.2f})"
                f"{' <b>interrupted</b>' if self.interrupted else ''}<br>{verdict}"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                f"<small>scores 0-2; the coefficient (bold) is chosen on the eval split by the "
                f"harmonic mean, and reported on the test split.</small></div>")

    @staticmethod
    def _html_row(t: dict, chosen: float | None) -> str:
        bold = ' style="font-weight:bold"' if t["condition"] == "steered" and t["coef"] == chosen else ""
        coef = "" if t["condition"] in ("none", "prompting") else f"{t['coef']:+g}"
        cells = [t["condition"], coef, t["split"], str(t["n"]), *(f"{t[k]:.2f}" for k in SCORES)]
        return f"<tr{bold}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"

    def __repr__(self) -> str:
        chosen = self.chosen_coef
        return (f"Evaluation({self.vector!r} for {self.concept!r}: {len(self.rows)} answers, chosen coef "
                f"{'-' if chosen is None else f'{chosen:+g}'}{', interrupted' if self.interrupted else ''})")
