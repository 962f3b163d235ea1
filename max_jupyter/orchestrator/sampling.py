"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from max_jupyter.validation import MAX_SEED, MAX_TEMPERATURE, check_int, check_real


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy (argmax); ``top_k == 0`` and ``top_p == 1`` disable
    those filters; the same ``seed`` gives the same tokens for the same logits.

    Checked at construction (``BadArgumentError``): ``temperature`` a finite number in
    ``0..MAX_TEMPERATURE``, ``top_k`` an int >= 0, ``top_p`` in ``(0, 1]``, ``seed`` None or
    an int in ``0..2**63-1`` (never a float or bool). Values are stored normalised
    (``temperature``/``top_p`` as float, ``top_k``/``seed`` as int).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        checked = {
            "temperature": check_real(
                "temperature", self.temperature, low=0, high=MAX_TEMPERATURE,
                fix=f"use 0 (greedy) up to {MAX_TEMPERATURE:g} (typical 0.7-1.0; far higher is "
                    f"uniform noise)"),
            "top_k": check_int("top_k", self.top_k, low=0, fix="use an int >= 0 (0 = off)"),
            "top_p": check_real("top_p", self.top_p, low=0, low_open=True, high=1,
                                fix="use a number in (0, 1] (1 = off)"),
            "seed": None if self.seed is None else check_int(
                "seed", self.seed, low=0, high=MAX_SEED, fix=f"use an int in 0..{MAX_SEED} or None"),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)


TOP_P_HEAD = 1024
"""The likeliest tokens top-p looks among first (``Sampler.probabilities``)."""


class Sampler:
    """Draws tokens for one generation; holds its own random generator."""

    def __init__(self, config: SamplingConfig = SamplingConfig()):
        self.config = config
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            g = torch.Generator(device=device)
            if self.config.seed is None:
                g.seed()
            else:
                g.manual_seed(self.config.seed)
            self._generators[device] = g
        return self._generators[device]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``[vocab]`` float32 distribution after temperature, top-k and top-p (greedy: one-hot)."""
        c = self.config
        logits = logits.float()
        if c.temperature == 0:
            probs = torch.zeros_like(logits)
            probs[logits.argmax()] = 1.0
            return probs
        logits = logits / c.temperature
        if c.top_k:
            kth = torch.topk(logits, min(c.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if c.top_p < 1:
            # The nucleus is nearly always among the likeliest few hundred tokens: a top-k of
            # TOP_P_HEAD costs ~1 ms where sorting a 152k vocabulary costs ~15 (CPU); the whole
            # sort only where the head holds less than top_p. The same set, up to ties at the cut.
            sorted_p, order = torch.topk(probs, min(TOP_P_HEAD, probs.numel()))
            if float(sorted_p.sum()) < c.top_p:
                sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p >= c.top_p  # keep the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p.masked_fill(drop, 0.0))
            probs = probs / probs.sum()
        return probs

    def sample(self, logits: torch.Tensor) -> tuple[int, float]:
        """Next token id and its probability under the filtered distribution."""
        if self.config.temperature == 0:
            token = int(logits.argmax())
            return token, 1.0
        probs = self.probabilities(logits)
        token = self.draw(probs)
        return token, float(probs[token])

    def draw(self, probs: torch.Tensor) -> int:
        """A token from the distribution ``probs`` ``[vocab]`` (greedy: its argmax, no draw)."""
        if self.config.temperature == 0:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=self._generator(probs.device)))

    def accept(self, p: float, q: float) -> bool:
        """True with probability ``min(1, p / q)``: whether speculative sampling keeps a
        token drafted with probability ``q`` that the big model gives ``p``. Draws a uniform
        only when ``0 < p < q`` (so greedy, where both are 0 or 1, never draws)."""
        if p >= q:
            return True
        if p <= 0:
            return False
        return float(torch.rand((), generator=self._generator(torch.device("cpu")))) * q < p


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p - q))``: where speculative sampling draws after rejecting a draft
    from ``q`` (``p`` itself where rounding left nothing, since a rejection implies
    ``p != q``). ``q`` is moved to ``p``'s device."""
    rest = (p - q.to(p.device)).clamp_(min=0)
    total = float(rest.sum())
    return rest / total if total > 0 else p
