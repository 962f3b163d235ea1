"""Coefficient sweeps: the same prompt generated with one vector at a range of
coefficients, each row scored by the unsteered model's perplexity of its text and by the
text's degeneracy (``evaluation.degeneracy``), which keeps a collapsed row from ranking
above a coherent one."""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from max_jupyter.engines.base import Engine
from max_jupyter.errors import BadArgumentError
from max_jupyter.evaluation.degeneracy import COLLAPSED, Degeneracy, degeneracy
from max_jupyter.jupyter.render import token_pieces
from max_jupyter.jupyter.steerspec import SteerTerm, spec_mix
from max_jupyter.orchestrator.options import GenerationOptions
from max_jupyter.orchestrator.trace import GenerationResult

MAX_ROWS = 101


def parse_coefs(text: str) -> list[float]:
    """``"-2:2:0.5"`` (start:stop:step, stop included) or ``"-1,0,0.5"`` -> coefficients."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            coefs = [round(start + i * step, 10) for i in range(n)]
        else:
            coefs = [float(x) for x in text.split(",")]
    except ValueError:
        raise BadArgumentError(f"--coefs {text!r}: write START:STOP:STEP with STEP > 0 and "
                               f"STOP >= START (e.g. -2:2:0.5), or a list such as -1,0,1.") from None
    if not 0 < len(coefs) <= MAX_ROWS or not all(math.isfinite(c) for c in coefs):
        raise BadArgumentError(f"--coefs {text!r} gives {len(coefs)} finite coefficients; "
                               f"a sweep takes 1..{MAX_ROWS}.")
    return coefs


SCORE_CHUNK = 256  # tokens per verify pass: bounds the [n, vocab] float32 logits held at once


def perplexity(engine: Engine, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> float:
    """exp(mean negative log-likelihood) of ``token_ids`` after ``prompt_ids`` under
    ``engine`` with no steering (NaN for no tokens): a prefill of the prompt, then one
    ``verify`` pass over the tokens (per ``SCORE_CHUNK``) for the logits of every position;
    token by token where the engine has no verify. Side effect: resets the engine's cache."""
    token_ids = list(token_ids)
    if not token_ids:
        return math.nan
    try:
        nll = _nll(engine.prefill(list(prompt_ids)).logits[None], token_ids[:1])
        fed, targets = token_ids[:-1], token_ids[1:]
        verify = engine.supports_verify
        step = SCORE_CHUNK if verify else 1
        for start in range(0, len(fed), step):
            part = fed[start:start + step]
            logits = engine.verify(part).all_logits if verify else engine.forward(part).logits[None]
            nll += _nll(logits, targets[start:start + step])
    finally:
        engine.reset()
    return math.exp(nll / len(token_ids))


def _nll(logits: torch.Tensor, targets: list[int]) -> float:
    """Summed negative log-likelihood of ``targets`` under ``logits`` ``[len(targets), vocab]``."""
    logp = torch.log_softmax(logits.float(), -1)
    return -float(logp[torch.arange(len(targets)), torch.tensor(targets, device=logp.device)].sum())


@dataclass(repr=False)
class SweepRow:
    """One coefficient: its generation, the unsteered model's perplexity of its text (None:
    not scored, the row was interrupted) and the text's ``Degeneracy`` (collapse measures)."""

    coef: float
    result: GenerationResult
    degeneracy: Degeneracy
    perplexity: float | None = None

    @property
    def text(self) -> str:
        return self.result.text

    @property
    def interrupted(self) -> bool:
        """Ctrl-C stopped its generation or its scoring: partial text, no perplexity."""
        return self.result.finish_reason == "interrupted" or self.perplexity is None

    @property
    def status(self) -> str:
        """``"interrupted"``, ``"collapsed"`` (``Degeneracy.collapsed``) or ``"ok"``."""
        return "interrupted" if self.interrupted else "collapsed" if self.degeneracy.collapsed else "ok"

    def rank_key(self) -> tuple:
        """Sort key, best first: coherent rows by perplexity (a row without tokens last
        among them), then collapsed rows by degeneracy, then interrupted rows."""
        order = ("ok", "collapsed", "interrupted").index(self.status)
        if order == 2:
            return (2, 0.0, 0.0)
        ppl = math.inf if math.isnan(self.perplexity) else self.perplexity
        return (order, self.degeneracy.score if order else 0.0, ppl)

    def _perplexity_text(self) -> str:
        if self.interrupted:
            return "interrupted"
        return "no tokens" if math.isnan(self.perplexity) else f"{self.perplexity:.2f}"

    def __repr__(self) -> str:
        return (f"SweepRow(coef={self.coef:g}, perplexity={self._perplexity_text()}, "
                f"degeneracy={self.degeneracy.score:.2f}, text={self.text!r})")


@dataclass(repr=False)
class Sweep:
    """The rows of a sweep of ``spec`` (a vector name, maybe with ``@layers``) on ``prompt``,
    in coefficient order; ``ranked()`` orders them best first."""

    spec: str
    prompt: str
    rows: list[SweepRow] = field(default_factory=list)

    @property
    def coefs(self) -> list[float]:
        return [r.coef for r in self.rows]

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]

    @property
    def perplexities(self) -> torch.Tensor:
        """``[rows]`` float32; NaN for an interrupted row (not scored)."""
        return torch.tensor([math.nan if r.perplexity is None else r.perplexity for r in self.rows])

    def ranked(self) -> list[SweepRow]:
        """The rows best first: coherent rows by perplexity (lower first), then collapsed
        rows (a low perplexity does not save a collapsed text), then interrupted rows."""
        return sorted(self.rows, key=SweepRow.rank_key)

    def plot(self):
        """The sweep as a chart (``plots.plot_sweep``)."""
        from max_jupyter.jupyter.plots import plot_sweep

        return plot_sweep(self)

    def _repr_html_(self) -> str:
        rank = {id(r): i + 1 for i, r in enumerate(self.ranked())}
        rows = "".join(f"<tr><td>{r.coef:+g}</td><td>{rank[id(r)]}</td><td>{r._perplexity_text()}</td>"
                       f"<td>{r.degeneracy.repetition:.2f}</td><td>{r.degeneracy.nonword:.2f}</td>"
                       f"<td>{'' if r.status == 'ok' else r.status}</td><td>{len(r.result.token_ids)}</td>"
                       f'<td style="text-align:left;white-space:pre-wrap">{html.escape(r.text)}</td></tr>'
                       for r in self.rows)
        return (f"<div><b>sweep of {html.escape(self.spec)}</b> on "
                f"<i>{html.escape(self.prompt[:80])}</i><table><thead><tr><th>coef</th><th>rank</th>"
                f"<th>perplexity (unsteered)</th><th>repetition</th><th>non-word</th><th>status</th>"
                f"<th>tokens</th><th style='text-align:left'>text</th></tr></thead><tbody>{rows}</tbody>"
                f"</table><small>rank: coherent rows by perplexity, then collapsed rows (repetition "
                f"or non-word share &ge; {COLLAPSED}), then interrupted ones.</small></div>")

    def __repr__(self) -> str:
        return f"Sweep({self.spec!r}, {len(self.rows)} rows)"

    def _repr_pretty_(self, p, cycle: bool) -> None:
        p.text(f"Sweep({self.spec}, {len(self.rows)} rows)")
        for r in self.rows:
            p.break_()
            p.text(f"{r.coef:+8g}  ppl {r._perplexity_text():>11}  degeneracy {r.degeneracy.score:.2f}"
                   f"{'  ' + r.status if r.status != 'ok' else ''}  {r.text.strip()[:60]!r}")


def run_sweep(session, prompt: str, term: SteerTerm, coefs: Sequence[float],
              options: GenerationOptions | None = None, *, progress: bool = True,
              **overrides) -> Sweep:
    """Generate ``prompt`` once per coefficient with ``coef * term.name`` at ``term.layers``
    (on top of the live mix), all rows as one batch (``Session.generate_batch``: no judges,
    no small model), then score
    each text with the unsteered big model on the Session's worker (perplexity) and by its
    degeneracy. ``options`` and ``overrides``: as ``Session.generate`` takes them (each row
    adds its own ``steering``). Ctrl-C ends the sweep with what it has: rows whose
    generation or scoring it stopped keep their partial text and are marked interrupted,
    without a perplexity."""
    from tqdm.auto import tqdm

    spec = f"{term.name}@{','.join(map(str, term.layers))}" if term.layers else term.name
    sweep = Sweep(spec, prompt)
    mixes = [spec_mix([SteerTerm(term.name, c, term.layers)], session.vectors, session.big.identity)
             for c in coefs]  # every coefficient checked before the batch
    tokenizer = session.big.tokenizer
    results = session.generate_batch([prompt] * len(coefs), mixes, options, progress=progress, **overrides)
    sweep.rows = [SweepRow(coef, result, degeneracy(token_pieces(tokenizer, result.token_ids)))
                  for coef, result in zip(coefs, results)]
    try:
        for row in tqdm([r for r in sweep.rows if r.result.finish_reason != "interrupted"],
                        desc=f"scoring {spec}", disable=not progress, leave=False):
            ids = (row.result.prompt_ids, row.result.token_ids)
            row.perplexity = session.run(lambda s, ids=ids: perplexity(s.big, *ids))
    except KeyboardInterrupt:
        pass  # the rows scored so far keep their perplexity
    return sweep
