"""The trace of a cognitive generation: per-step records, events and stacked tensors.

Row ``t`` of every per-step tensor belongs to step ``t`` — the choice of generated token
``t`` — and holds the state that token was predicted from: the big model's residual at
the last position of the forward that produced its logits (after any delta), the small
model's residual after it consumed token ``t - 1`` (or the prompt), and both models'
next-token logits. Every sampled step has a row, including one that sampled EOS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from max_jupyter.engines.base import Engine, ForwardResult, LayerDeltas
from max_jupyter.engines.intervention import additions
from max_jupyter.errors import BadArgumentError, UnknownNameError, warn_deprecated


@dataclass(frozen=True)
class TraceConfig:
    """What to record. ``big_layers`` / ``small_layers``: residuals to capture per step;
    ``prompt``: also keep the big model's residuals at ``big_layers`` for every prompt
    position (``GenerationResult.prompt_hidden``); ``top_k``: how many top logits of each
    model to keep; ``full_logits``: also keep ``[steps, vocab]`` logits; ``on_device``: leave
    tensors on the engines' device; ``spelling``: how an error about an uncaptured layer
    says to capture more (``"python"``: ``TraceConfig(...)``; ``"magic"``: ``--capture``)."""

    big_layers: tuple[int, ...] = ()
    small_layers: tuple[int, ...] = ()
    top_k: int = 10
    full_logits: bool = False
    on_device: bool = False
    prompt: bool = False
    spelling: str = "python"

    def __post_init__(self):
        if self.top_k < 1:
            raise BadArgumentError(f"top_k must be >= 1; got {self.top_k}.")
        if self.prompt and not self.big_layers:
            raise BadArgumentError("prompt=True keeps the prompt's states at big_layers, which is "
                                   "empty; give big_layers=(...) too.")
        if self.spelling not in ("python", "magic"):
            raise BadArgumentError(f"spelling must be 'python' or 'magic'; got {self.spelling!r}.")

    def how_to_capture(self, field_name: str, layers: list[int]) -> str:
        """How to ask for ``layers`` in ``field_name`` (``big_hidden`` / ``small_hidden`` /
        ``prompt_hidden``), in this config's spelling."""
        prompt = field_name == "prompt_hidden"
        if self.spelling == "magic":
            option = "--capture-small" if field_name == "small_hidden" else "--capture"
            return f"{option} {','.join(map(str, layers))}" + (" --capture-prompt" if prompt else "")
        keyword = "small_layers" if field_name == "small_hidden" else "big_layers"
        return f"TraceConfig({keyword}={tuple(layers)!r}" + (", prompt=True)" if prompt else ")")


class LayerStates(dict):
    """Captured states: layer -> tensor. Asking for a layer that was not captured raises
    ``UnknownNameError`` (a ``KeyError``) naming the captured layers and how to capture it."""

    def __init__(self, states: dict[int, torch.Tensor], field_name: str, config: TraceConfig):
        super().__init__(states)
        self.field_name, self.config = field_name, config

    def __missing__(self, layer):
        captured = sorted(self)
        wanted = sorted({*captured, layer}) if isinstance(layer, int) else captured
        raise UnknownNameError(f"{self.field_name}[{layer!r}]: layer {layer!r} was not captured "
                               f"(captured: {', '.join(map(str, captured)) or 'none'}); capture it "
                               f"with {self.config.how_to_capture(self.field_name, wanted)}.")


@dataclass(slots=True)
class StepRecord:
    """One step. ``mixes_on``: the named mixes judges turned on that the step's final forward
    ran with; ``scores``: judge
    name -> score; ``rerun``: a post-step judge re-ran the step; ``unsteered_token`` /
    ``unsteered_prob``: what the first pass would have sampled (re-run steps only);
    ``sampler_prob``: probability of ``token`` under the sampler's distribution (after
    temperature / top-k / top-p: 1.0 when greedy); ``model_prob``: the model's own
    probability of ``token`` (softmax of the step's raw logits at temperature 1, before
    any sampling transform; the logits the trace records); ``judge_s``: time
    spent in judges and mix resolution this step (no model forwards); ``live_coefs``: the
    live mix's coefficients (entry name -> coef) this step ran with (shared between steps with
    the same mix: do not mutate); ``steered``: the final forward ran with any delta (the
    live mix, the call's steering or a judge's mix). Speculative decoding: on the step
    whose verify pass began a block, ``drafted`` holds the small model's draft and
    ``accepted`` how many of it the big model accepted (the tokens of this and the next
    steps; the step after them took the token drawn after them — unless a judge ended the
    block earlier, and plain steps followed); ``rejected`` is the rest; other steps ``()``
    and 0."""

    step: int
    token: int
    sampler_prob: float
    scores: dict[str, float]
    mixes_on: tuple[str, ...]
    rerun: bool = False
    unsteered_token: int | None = None
    unsteered_prob: float | None = None
    judge_s: float = 0.0
    live_coefs: dict[str, float] = field(default_factory=dict)
    steered: bool = False
    drafted: tuple[int, ...] = ()
    accepted: int = 0
    model_prob: float = math.nan
    interventions: dict[int, str] = field(default_factory=dict)
    """layer -> what the final forward did there (``"add"``, ``"ablate1+clamp1+add"``:
    engines/intervention.py's order); empty when unsteered."""

    @property
    def prob(self) -> float:
        """Deprecated name of ``sampler_prob`` (the model's own is ``model_prob``)."""
        warn_deprecated("StepRecord.prob", "StepRecord.sampler_prob (or model_prob)")
        return self.sampler_prob

    @property
    def steering(self) -> tuple[str, ...]:
        """Deprecated name of ``mixes_on``."""
        warn_deprecated("StepRecord.steering", "StepRecord.mixes_on")
        return self.mixes_on

    @property
    def mix(self) -> dict[str, float]:
        """Deprecated name of ``live_coefs``."""
        warn_deprecated("StepRecord.mix", "StepRecord.live_coefs")
        return self.live_coefs

    @property
    def rejected(self) -> tuple[int, ...]:
        """The drafted tokens the big model did not take."""
        return self.drafted[self.accepted:]

    @property
    def changed(self) -> bool:
        """The re-run chose a different token than the first pass would have."""
        return self.rerun and self.unsteered_token != self.token


@dataclass(frozen=True, slots=True)
class StepEvent:
    """Emitted once per step (``record`` set, ``text`` the newly showable text, possibly
    empty), and once more at the end with ``record=None`` if text was held back until then."""

    record: StepRecord | None
    text: str


class TopK(NamedTuple):
    """``ids``: ``[steps, k]`` int64; ``logits``: ``[steps, k]`` float32, best first."""

    ids: torch.Tensor
    logits: torch.Tensor


@dataclass
class GenerationResult:
    """One finished generation and its trace. ``finish_reason``: eos, stop, length,
    aborted, interrupted or error. ``incomplete``: the last tokens ended inside a character,
    whose bytes were dropped from ``text`` (never shown as U+FFFD). Tensors (detached; CPU
    unless ``TraceConfig.on_device``):

    - ``big_hidden`` / ``small_hidden``: layer -> ``[steps, hidden]`` (requested layers; an
      uncaptured layer raises ``UnknownNameError`` saying how to capture it);
    - ``prompt_hidden``: layer -> ``[prompt_len, hidden]``, the big model's residual at every
      prompt position (the prefill's final forward: steered like it) when
      ``TraceConfig.prompt``, else empty; its last row is ``big_hidden``'s row 0;
    - ``deltas``: layer -> ``[steps, hidden]``, the delta added at that layer by each
      step's final forward (zeros where none: an ablation or clamp adds nothing; what ran
      is in each ``StepRecord.interventions``), for every layer any step added at;
    - ``big_topk`` / ``small_topk``: ``TopK`` of each step's next-token logits (the final
      pass for the big model); ``first_pass_topk``: the big model's before any re-run
      (equal to ``big_topk`` on steps not re-run);
    - ``big_logits`` / ``small_logits``: ``[steps, vocab]`` when ``full_logits``, else None.

    ``small_ids``: the small model's context after the generation (None without one).
    ``str_tokens`` / ``prompt_str_tokens``: each generated / prompt token as text, one string
    per token (like TransformerLens' ``to_str_tokens``; a token holding part of a UTF-8
    character shows its bytes, ``<0xF0><0x9F>``: ``Tokenizer.token_text``).
    ``ahead_misses``: big forwards issued ahead of their step (``CognitiveOrchestrator(
    overlap=...)``) with deltas the step's judges or a mix then changed, so rewound and run
    again (not re-runs).
    ``start_mix``: the live mix's coefficients (entry name -> coef) when the generation
    started, whatever a slider did later.
    ``speculate_off``: why a generation asked to speculate (``speculate > 0``) did not
    (no small model, another vocabulary, no verify on the big engine); None otherwise.
    ``probe_scores``: concept -> ``[steps]`` P(concept) of the text so far after each token,
    read by the session's reader when the generation ends (``GenerationOptions.probes``).
    """

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    elapsed_s: float = 0.0
    incomplete: bool = False
    steps: list[StepRecord] = field(default_factory=list)
    big_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    small_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    prompt_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)
    big_topk: TopK | None = None
    first_pass_topk: TopK | None = None
    small_topk: TopK | None = None
    big_logits: torch.Tensor | None = None
    small_logits: torch.Tensor | None = None
    small_ids: list[int] | None = None
    ahead_misses: int = 0
    speculate_off: str | None = None
    start_mix: dict[str, float] = field(default_factory=dict)
    str_tokens: list[str] = field(default_factory=list)
    prompt_str_tokens: list[str] = field(default_factory=list)
    probe_scores: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def speculation_misses(self) -> int:
        """Deprecated name of ``ahead_misses`` (issuing a forward ahead is not speculative
        decoding)."""
        warn_deprecated("GenerationResult.speculation_misses", "GenerationResult.ahead_misses")
        return self.ahead_misses

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def drafted_tokens(self) -> int:
        """Tokens the small model drafted (speculative decoding)."""
        return sum(len(r.drafted) for r in self.steps)

    @property
    def accepted_tokens(self) -> int:
        """Drafted tokens the big model accepted."""
        return sum(r.accepted for r in self.steps)

    @property
    def acceptance_rate(self) -> float | None:
        """``accepted_tokens / drafted_tokens``; None where nothing was drafted."""
        drafted = self.drafted_tokens
        return self.accepted_tokens / drafted if drafted else None

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """Judge name -> ``[steps]`` float32 scores (NaN where it gave none)."""
        names = dict.fromkeys(n for r in self.steps for n in r.scores)
        return {n: torch.tensor([r.scores.get(n, math.nan) for r in self.steps]) for n in names}

    @property
    def steered(self) -> torch.Tensor:
        """``[steps]`` bool: the step's final forward added a delta (any steering)."""
        return torch.tensor([r.steered for r in self.steps], dtype=torch.bool)

    @property
    def reruns(self) -> torch.Tensor:
        """``[steps]`` bool: the step was re-run."""
        return torch.tensor([r.rerun for r in self.steps], dtype=torch.bool)

    @property
    def model_probs(self) -> torch.Tensor:
        """``[steps]`` float32: the model's probability of each chosen token (softmax of
        the raw logits at temperature 1)."""
        return torch.tensor([r.model_prob for r in self.steps])

    @property
    def sampler_probs(self) -> torch.Tensor:
        """``[steps]`` float32: probability of each chosen token under the sampler (1.0
        when greedy)."""
        return torch.tensor([r.sampler_prob for r in self.steps])

    @property
    def probs(self) -> torch.Tensor:
        """Deprecated name of ``sampler_probs`` (the model's own are ``model_probs``)."""
        warn_deprecated("GenerationResult.probs", "GenerationResult.sampler_probs (or model_probs)")
        return self.sampler_probs


class TraceRecorder:
    """Collects per-step rows (references, no copies) and stacks them at ``finish``."""

    def __init__(self, config: TraceConfig, big: Engine, small: Engine | None):
        self.config, self.big, self.small = config, big, small
        self.big_hidden: dict[int, list[torch.Tensor]] = {l: [] for l in config.big_layers}
        self.small_hidden: dict[int, list[torch.Tensor]] = {l: [] for l in config.small_layers}
        self.prompt_hidden: dict[int, torch.Tensor] = {}  # the step-0 prefill's rows, if asked
        self.deltas: list[LayerDeltas | None] = []
        self.big_topk: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.first_topk: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.small_topk: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.big_logits: list[torch.Tensor] = []
        self.small_logits: list[torch.Tensor] = []

    def add(self, out: ForwardResult, first: ForwardResult | None, deltas: LayerDeltas | None,
            small_hidden: dict[int, torch.Tensor], small_logits: torch.Tensor | None,
            top: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """One step: the big model's final forward ``out`` (and ``first`` pass if re-run),
        the deltas ``out`` ran with, and the small model's state the step was judged from;
        ``top``: ``(values, ids)`` of ``out.logits``' top ``top_k`` if already taken (a
        batch takes every row's at once)."""
        k = self.config.top_k
        if self.config.prompt and not self.deltas:  # step 0: ``out`` is the prompt's prefill
            self.prompt_hidden = {l: out.hidden[l] for l in self.big_hidden}  # [prompt_len, hidden]
        for layer, rows in self.big_hidden.items():
            rows.append(out.hidden[layer][-1])  # [hidden]
        for layer, rows in self.small_hidden.items():
            rows.append(small_hidden[layer])  # [hidden_small]
        self.deltas.append(deltas)
        if top is None:
            top = torch.topk(out.logits, min(k, out.logits.shape[-1]))
        self.big_topk.append(top)
        self.first_topk.append(top if first is None else
                               torch.topk(first.logits, min(k, first.logits.shape[-1])))
        if small_logits is not None:
            self.small_topk.append(torch.topk(small_logits, min(k, small_logits.shape[-1])))
        if self.config.full_logits:
            self.big_logits.append(out.logits)
            if small_logits is not None:
                self.small_logits.append(small_logits)

    def finish(self, result: GenerationResult) -> None:
        """Stack the rows of ``result.steps`` into its tensor fields (rows of a step cut
        short by an interrupt, before its record was added, are dropped)."""
        n = len(result.steps)
        move = (lambda t: t) if self.config.on_device else (lambda t: t.to("cpu"))
        big_h = self.big.identity.hidden_size

        def stack(rows: list[torch.Tensor], width: int, dtype: torch.dtype) -> torch.Tensor:
            return move(torch.stack(rows[:n])) if rows[:n] else torch.empty(0, width, dtype=dtype)

        config = self.config
        result.big_hidden = LayerStates({l: stack(r, big_h, self.big.dtype)
                                         for l, r in self.big_hidden.items()}, "big_hidden", config)
        result.prompt_hidden = LayerStates({l: move(t) for l, t in self.prompt_hidden.items()},
                                           "prompt_hidden", config)
        small_states = {}
        if self.small is not None:
            small_h = self.small.identity.hidden_size
            small_states = {l: stack(r, small_h, self.small.dtype) for l, r in self.small_hidden.items()}
        result.small_hidden = LayerStates(small_states, "small_hidden", config)
        tokenizer = self.big.tokenizer
        result.str_tokens = [tokenizer.token_text(t) for t in result.token_ids]
        result.prompt_str_tokens = [tokenizer.token_text(t) for t in result.prompt_ids]
        deltas = [additions(d) if d else d for d in self.deltas[:n]]  # ablations: in the records
        for layer in sorted({l for d in deltas if d for l in d}):
            zero = torch.zeros(big_h, device=self.big.device, dtype=self.big.dtype)
            result.deltas[layer] = move(torch.stack([d[layer] if d and layer in d else zero
                                                     for d in deltas]))

        def topk(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> TopK:
            k = min(self.config.top_k, self.big.identity.vocab_size)
            rows = rows[:n]
            if not rows:
                return TopK(torch.empty(0, k, dtype=torch.long), torch.empty(0, k))
            return TopK(move(torch.stack([r[1] for r in rows])), move(torch.stack([r[0] for r in rows])))

        result.big_topk = topk(self.big_topk)
        result.first_pass_topk = topk(self.first_topk)
        if self.small is not None:
            result.small_topk = topk(self.small_topk)
        if self.config.full_logits:
            result.big_logits = stack(self.big_logits, self.big.identity.vocab_size, torch.float32)
            if self.small is not None:
                result.small_logits = stack(self.small_logits, self.small.identity.vocab_size,
                                            torch.float32)
