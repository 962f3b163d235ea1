"""Coefficient sweeps: the same prompt generated with one vector at a range of
coefficients, each row scored by the unsteered model's perplexity of its text."""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from max_jupyter.engines.base import Engine
from max_jupyter.errors import BadArgumentError
from max_jupyter.jupyter.steerspec import SteerTerm, spec_mix
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


def perplexity(engine: Engine, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> float:
    """exp(mean negative log-likelihood) of ``token_ids`` after ``prompt_ids`` under
    ``engine`` with no steering (NaN for no tokens). Side effect: resets the engine's cache."""
    if not token_ids:
        return math.nan
    nll = 0.0
    logits = engine.prefill(list(prompt_ids)).logits
    for i, token in enumerate(token_ids):
        nll -= float(torch.log_softmax(logits.float(), -1)[token])
        if i + 1 < len(token_ids):
            logits = engine.step(token).logits
    engine.reset()
    return math.exp(nll / len(token_ids))


@dataclass(repr=False)
class SweepRow:
    """One coefficient: its generation and the unsteered model's perplexity of its text."""

    coef: float
    result: GenerationResult

    perplexity: float = math.nan

    @property
    def text(self) -> str:
        return self.result.text

    def __repr__(self) -> str:
        return f"SweepRow(coef={self.coef:g}, perplexity={self.perplexity:.2f}, text={self.text!r})"


@dataclass(repr=False)
class Sweep:
    """The rows of a sweep of ``spec`` (a vector name, maybe with ``@layers``) on ``prompt``."""

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
        """``[rows]`` float32."""
        return torch.tensor([r.perplexity for r in self.rows])

    def plot(self):
        """The sweep as a chart (``plots.plot_sweep``)."""
        from max_jupyter.jupyter.plots import plot_sweep

        return plot_sweep(self)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{r.coef:+g}</td><td>{r.perplexity:.2f}</td>"
                       f"<td>{len(r.result.token_ids)}</td>"
                       f'<td style="text-align:left;white-space:pre-wrap">{html.escape(r.text)}</td></tr>'
                       for r in self.rows)
        return (f"<div><b>sweep of {html.escape(self.spec)}</b> on "
                f"<i>{html.escape(self.prompt[:80])}</i><table><thead><tr><th>coef</th>"
                f"<th>perplexity (unsteered)</th><th>tokens</th><th style='text-align:left'>text</th>"
                f"</tr></thead><tbody>{rows}</tbody></table></div>")

    def __repr__(self) -> str:
        return f"Sweep({self.spec!r}, {len(self.rows)} rows)"

    def _repr_pretty_(self, p, cycle: bool) -> None:
        p.text(f"Sweep({self.spec}, {len(self.rows)} rows)")
        for r in self.rows:
            p.break_()
            p.text(f"{r.coef:+8g}  ppl {r.perplexity:8.2f}  {r.text.strip()[:60]!r}")


def run_sweep(session, prompt: str, term: SteerTerm, coefs: Sequence[float], *,
              progress: bool = True, **options) -> Sweep:
    """Generate ``prompt`` once per coefficient with ``coef * term.name`` at ``term.layers``
    (on top of the live mix), then score each text with the unsteered big model on the
    Session's worker. ``options``: generation options of ``Session.generate``. Ctrl-C ends
    the sweep with the rows so far (an interrupted row keeps its partial text, perplexity
    NaN)."""
    from tqdm.auto import tqdm

    spec = f"{term.name}@{','.join(map(str, term.layers))}" if term.layers else term.name
    sweep = Sweep(spec, prompt)
    mixes = [spec_mix([SteerTerm(term.name, c, term.layers)], session.vectors, session.big.identity)
             for c in coefs]  # every coefficient checked before the first generation
    try:
        for coef, steering in tqdm(list(zip(coefs, mixes)), desc=f"sweep {spec}",
                                   disable=not progress, leave=False):
            result = session.generate(prompt, steering=steering, **options)
            row = SweepRow(coef, result)
            sweep.rows.append(row)
            if result.finish_reason == "interrupted":
                break
            row.perplexity = session.run(lambda s: perplexity(s.big, result.prompt_ids,
                                                              result.token_ids))
    except KeyboardInterrupt:
        pass  # the rows so far are the result
    return sweep
