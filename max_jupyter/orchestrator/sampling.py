"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy (argmax); ``top_k == 0`` and ``top_p == 1`` disable
    those filters; the same ``seed`` gives the same tokens for the same logits."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off); got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off); got {self.top_p}.")


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
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p >= c.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
            probs = probs / probs.sum()
        return probs

    def sample(self, logits: torch.Tensor) -> tuple[int, float]:
        """Next token id and its probability under the filtered distribution."""
        if self.config.temperature == 0:
            token = int(logits.argmax())
            return token, 1.0
        probs = self.probabilities(logits)
        token = int(torch.multinomial(probs, 1, generator=self._generator(probs.device)))
        return token, float(probs[token])
