"""The engine contract: what every backend (transformers, ExLlamaV2, ...) provides.

An engine owns its weights, its tokenizer and one KV cache (batch 1). Layer ``i``
(0-based) always means "the residual stream at the output of decoder block ``i``" —
the convention of llama.cpp control vectors, repeng and HF ``hidden_states[i + 1]``.
Deltas are added there, in the same forward pass that captures hidden states there.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from max_jupyter.errors import ContextOverflowError

if TYPE_CHECKING:
    from max_jupyter.tokenizer import Tokenizer

LayerDeltas = Mapping[int, torch.Tensor]
"""Per-layer additive deltas: layer -> ``[hidden]`` tensor on the engine's device and dtype."""


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
    """

    logits: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


class Engine(ABC):
    """A batch-1 language model with a KV cache, residual-stream access and a tokenizer.

    Backends implement ``forward``, ``rewind``, ``reset`` and ``seq_len``. Every call that
    feeds tokens appends them to the cache; a call that fails or is interrupted leaves the
    cache as it was before the call (``seq_len`` unchanged, next logits unchanged).
    """

    identity: ModelIdentity
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    max_seq_len: int
    launches_async: bool = False
    """One-token ``forward`` returns before the device has finished it, and its work runs
    concurrently with another engine's (reading ``logits`` or ``hidden`` synchronises). A
    caller may then issue this engine's step, do other work, and rewind it if not wanted."""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Number of positions held in the KV cache."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the KV cache."""

    @abstractmethod
    def forward(self, ids: Sequence[int], deltas: LayerDeltas | None = None,
                capture: Collection[int] = ()) -> ForwardResult:
        """Feed ``ids`` after the cached positions, adding ``deltas`` and capturing ``capture``.

        Raises ``ContextOverflowError`` (before any compute) if they do not fit.
        """

    @abstractmethod
    def rewind(self, n: int) -> None:
        """Drop the last ``n`` cached positions (``0 <= n <= seq_len``)."""

    def prefill(self, ids: Sequence[int], deltas: LayerDeltas | None = None,
                capture: Collection[int] = ()) -> ForwardResult:
        """Empty the cache, then feed ``ids``."""
        if not ids:
            raise ValueError("prefill needs at least one token id; got an empty prompt.")
        check_room(self, len(ids), from_empty=True)
        self.reset()
        return self.forward(ids, deltas, capture)

    def step(self, token_id: int, deltas: LayerDeltas | None = None,
             capture: Collection[int] = ()) -> ForwardResult:
        """Feed one token; ``hidden`` rows are ``[1, hidden]``."""
        return self.forward([token_id], deltas, capture)


def check_layers(identity: ModelIdentity, layers: Collection[int], what: str) -> None:
    """Raise ``IndexError`` naming ``what`` if any layer is outside ``0..num_layers-1``."""
    bad = sorted(i for i in layers if not 0 <= i < identity.num_layers)
    if bad:
        raise IndexError(f"{what}: layer(s) {bad} out of range for {identity.describe()}; "
                         f"use 0..{identity.num_layers - 1} (output of decoder block i).")


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
