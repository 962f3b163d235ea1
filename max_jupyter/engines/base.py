"""The engine contract: what every backend (transformers, ExLlamaV2, ...) provides.

An engine owns its weights, its tokenizer and one KV cache (batch 1). Layer ``i``
(0-based) always means "the residual stream at the output of decoder block ``i``" —
the convention of llama.cpp control vectors, repeng and HF ``hidden_states[i + 1]``.
Deltas are added there, in the same forward pass that captures hidden states there.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

import max_jupyter.engines.residual as residual
from max_jupyter.engines.intervention import Intervention, additions, check_ops
from max_jupyter.errors import BackendUnavailableError, ContextOverflowError
from max_jupyter.validation import check_hidden_rows, check_int, check_layers, check_token_ids

if TYPE_CHECKING:
    from max_jupyter.tokenizer import Tokenizer

LayerDeltas = Mapping[int, torch.Tensor | Intervention]
"""Per-layer steering: layer -> a ``[hidden]`` tensor to add, or an ``Intervention``
(ablation, clamp and add; engines/intervention.py) where the engine
``supports_interventions``; moved to the engine's device and dtype if elsewhere."""


@dataclass(frozen=True)
class ModelIdentity:
    """Who a model is, for checking that vectors and judges fit it.

    ``fingerprint`` hashes a strided sample of the token-embedding table in fp16, so the
    same model in fp32, fp16 or EXL2 (whose embeddings stay fp16) has one fingerprint.
    """

    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    fingerprint: str

    def describe(self) -> str:
        return (f"{self.architecture} ({self.num_layers} layers, hidden {self.hidden_size}, "
                f"vocab {self.vocab_size}, weights {self.fingerprint[:12]})")


@dataclass
class ForwardResult:
    """What one forward pass (prefill or step) returns.

    ``logits``: ``[vocab]`` float32, next-token logits after the last fed token.
    ``hidden``: layer -> ``[n_fed, hidden]`` residual at the output of that block, one row
    per fed token (after any delta added there); detached, on the engine's device.
    ``all_logits``: ``[n_fed, vocab]`` float32, the logits after every fed token (row ``j``
    predicts the token after ``ids[j]``; the last row equals ``logits``); ``verify`` only,
    else None.
    """

    logits: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    all_logits: torch.Tensor | None = None


class Engine(ABC):
    """A batch-1 language model with a KV cache, residual-stream access and a tokenizer.

    Backends implement ``_forward``, ``_rewind``, ``_unembed``, ``reset`` and ``seq_len``. The public
    ``forward`` (and ``prefill``, ``step``) checks the arguments here, once for every
    backend, and raises ``BadArgumentError`` / ``ContextOverflowError`` before any compute:
    ids a non-empty list of ints in ``0..vocab_size-1``; deltas exactly ``[hidden]`` on
    known int layers (never broadcast), each with a finite norm of at most
    ``MAX_DELTA_RATIO`` times the layer's typical residual norm (``residual_norms``,
    measured by one forward the first time the engine feeds an empty cache); captures on
    known layers; room in the context.
    Every call that feeds tokens appends them to the cache; a call that fails or is
    interrupted leaves the cache as it was before the call (``seq_len`` unchanged, next
    logits unchanged). ``forward_calls`` counts the forward passes that ran.
    """

    identity: ModelIdentity
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    max_seq_len: int
    forward_calls: int = 0
    """Forward passes handed to the backend (checked calls and the one that measures
    ``residual_norms``), for tests and stats."""
    _bounded: object = None  # the last deltas found within the bound (engines/residual.py)
    launches_async: bool = False
    """One-token ``forward`` (and ``verify``) returns before the device has finished it, and
    its work runs concurrently with another engine's (reading ``logits``, ``all_logits`` or
    ``hidden`` synchronises). A caller may then issue this engine's pass, do other work, and
    rewind it if not wanted."""
    supports_interventions: bool = False
    """``deltas`` may hold ``Intervention`` values (else only tensors to add;
    ``BackendUnavailableError`` before any compute)."""
    supports_verify: bool = False
    """``verify`` works: the backend returns the logits of every fed position (for
    speculative decoding; callers check this flag and do not speculate without it)."""

    @property
    def residual_norms(self) -> dict[int, float] | None:
        """Typical residual norm per layer of this model (engines/residual.py); None until
        an engine of this model first fed an empty cache."""
        return residual.known(self.identity)

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Number of positions held in the KV cache."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the KV cache."""

    @abstractmethod
    def _forward(self, ids: list[int], deltas: dict[int, torch.Tensor],
                 capture: frozenset[int]) -> ForwardResult:
        """The backend's forward on checked arguments: ``ids`` in the vocabulary and fitting
        the context, ``deltas`` ``[hidden]`` on the engine's device and dtype at known
        layers, ``capture`` known layers. Restores the cache if it fails."""

    @abstractmethod
    def _rewind(self, n: int) -> None:
        """The backend's rewind by a checked ``n`` (``0 <= n <= seq_len``)."""

    @abstractmethod
    def _unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backend's final norm and LM head on checked rows (``[n, hidden]``, finite,
        on the engine's device and dtype): ``[n, vocab]`` float32 logits."""

    def rewind(self, n: int) -> None:
        """Drop the last ``n`` cached positions; ``n`` an int in ``0..seq_len``
        (``BadArgumentError`` otherwise, the cache unchanged)."""
        self._rewind(check_int("n", n, low=0, high=self.seq_len,
                               fix=f"rewind 0..{self.seq_len} positions (the cache holds {self.seq_len})"))

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, vocab]`` (float32, on the engine's device) of residuals ``hidden``
        ``[n, hidden]`` read through the final norm and the LM head, as if their layer were
        the last (the logit lens): ``unembed`` of the last layer's capture is the forward's
        logits. Rows from any layer, any float dtype and device (moved to the engine's).
        Touches no cache and counts no forward; ``BadArgumentError`` before any compute for
        another shape, a non-float dtype or a non-finite value."""
        hidden = check_hidden_rows(self.identity, hidden)
        with torch.inference_mode():
            return self._unembed(hidden.to(self.device, self.dtype))

    def forward(self, ids: Sequence[int], deltas: LayerDeltas | None = None,
                capture: Collection[int] = ()) -> ForwardResult:
        """Feed ``ids`` after the cached positions, adding ``deltas`` and capturing ``capture``.

        Raises ``BadArgumentError`` or ``ContextOverflowError`` before any compute.
        """
        return self._run(*self._checked(ids, deltas, capture, from_empty=False))

    def prefill(self, ids: Sequence[int], deltas: LayerDeltas | None = None,
                capture: Collection[int] = ()) -> ForwardResult:
        """Empty the cache, then feed ``ids`` (checked first: a refused call keeps the cache)."""
        args = self._checked(ids, deltas, capture, from_empty=True)
        self.reset()
        return self._run(*args)

    def verify(self, ids: Sequence[int], deltas: LayerDeltas | None = None,
               capture: Collection[int] = ()) -> ForwardResult:
        """``forward`` that also returns ``all_logits`` ``[len(ids), vocab]``: one pass over
        several new tokens (a draft), each position with the same ``deltas``, ``hidden``
        rows per position. Rewind a rejected tail with ``rewind``. Checked as ``forward``;
        ``BackendUnavailableError`` where the backend has no verify (``supports_verify``)."""
        if not self.supports_verify:
            raise BackendUnavailableError(
                f"{type(self).__name__} has no verify forward (per-position logits); "
                f"generate without speculation (speculate=0) on this backend.")
        args = self._checked(ids, deltas, capture, from_empty=False)
        self.forward_calls += 1
        return self._verify(*args)

    def _verify(self, ids: list[int], deltas: dict[int, torch.Tensor],
                capture: frozenset[int]) -> ForwardResult:
        """The backend's verify on checked arguments (as ``_forward``, with ``all_logits``);
        called only where ``supports_verify`` is set, which a backend sets with this."""
        raise BackendUnavailableError(f"{type(self).__name__} sets supports_verify without _verify.")

    def step(self, token_id: int, deltas: LayerDeltas | None = None,
             capture: Collection[int] = ()) -> ForwardResult:
        """Feed one token; ``hidden`` rows are ``[1, hidden]``."""
        return self.forward([token_id], deltas, capture)

    def _checked(self, ids: Sequence[int], deltas: LayerDeltas | None, capture: Collection[int],
                 from_empty: bool) -> tuple[list[int], dict[int, torch.Tensor], frozenset[int]]:
        """The contract's checks; returns the arguments normalised for ``_forward``."""
        ids = check_token_ids("ids", ids, self.identity.vocab_size)
        checked = check_ops(self.identity, deltas)
        layers = frozenset(check_layers(self.identity, capture, "capture"))
        check_room(self, len(ids), from_empty)
        added = additions(checked)  # the bound applies to what is added
        if not self.supports_interventions and any(isinstance(op, Intervention) for op in checked.values()):
            raise BackendUnavailableError(
                f"{type(self).__name__} only adds deltas (no ablation or clamp); steer it with "
                f"additions only, or use the transformers backend.")
        if from_empty or self.seq_len == 0:  # the cache may be emptied: measure once per model
            residual.measure(self)
        if added and not residual.same_deltas(added, self._bounded):  # once per mix change
            residual.check_delta_norms(self.identity, added, "deltas")
            self._bounded = residual.deltas_key(added)
        device, dtype = self.device, self.dtype
        return ids, {i: d if d.device == device and d.dtype == dtype else d.to(device, dtype)
                     for i, d in checked.items()}, layers

    def _run(self, ids: list[int], deltas: dict[int, torch.Tensor],
             capture: frozenset[int]) -> ForwardResult:
        self.forward_calls += 1
        return self._forward(ids, deltas, capture)


def check_room(engine: Engine, n_new: int, from_empty: bool = False) -> None:
    """Raise ``ContextOverflowError`` before any compute if ``n_new`` tokens do not fit."""
    cached = 0 if from_empty else engine.seq_len
    if cached + n_new > engine.max_seq_len:
        raise ContextOverflowError(
            f"{n_new} new tokens after {cached} cached exceed the context of "
            f"{engine.max_seq_len} tokens; shorten the prompt or lower max_new_tokens.")


def embedding_fingerprint(embedding: torch.Tensor) -> str:
    """sha256 (hex) of about 256 evenly strided rows of ``embedding`` ``[vocab, hidden]`` in fp16."""
    import hashlib

    rows = embedding[:: max(1, embedding.shape[0] // 256)]
    data = rows.detach().to("cpu", torch.float16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()
