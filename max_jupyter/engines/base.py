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
from max_jupyter.engines.intervention import Intervention, LayerOp, additions, check_ops
from max_jupyter.errors import BackendUnavailableError, BadArgumentError, ContextOverflowError
from max_jupyter.validation import check_deltas, check_hidden_rows, check_int, check_layers, check_token_ids, fail

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
    _ops_memo: tuple | None = None  # (deltas given, their key, checked ops): ``_checked_ops``
    launches_async: bool = False
    """One-token ``forward`` (and ``verify``) returns before the device has finished it, and
    its work runs concurrently with another engine's (reading ``logits``, ``all_logits`` or
    ``hidden`` synchronises). A caller may then issue this engine's pass, do other work, and
    rewind it if not wanted."""
    use_graphs: bool = False
    """Passes replay CUDA graphs, each captured by the first pass of its shape (slow once):
    speculation's pacing leaves such a first pass untimed."""
    supports_interventions: bool = False
    """``deltas`` may hold ``Intervention`` values (else only tensors to add;
    ``BackendUnavailableError`` before any compute)."""
    supports_batch: bool = False
    """The engine is a ``BatchEngine``: it runs a batch of sequences (``prefill_batch``,
    ``step_batch``); callers run a batch's rows one after another on others."""
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

    def verify(self, ids: Sequence[int], deltas: LayerDeltas | Sequence[LayerDeltas | None] | None = None,
               capture: Collection[int] = ()) -> ForwardResult:
        """``forward`` that also returns ``all_logits`` ``[len(ids), vocab]``: one pass over
        several new tokens (a draft), ``hidden`` rows per position. ``deltas``: one
        ``LayerDeltas`` for every position, or a sequence of one per position (``LayerDeltas``
        or None), position ``j`` steered by ``deltas[j]`` as ``step`` would steer it (a
        draft whose judges change their decision along it). Rewind a rejected tail with
        ``rewind``. Checked as ``forward``; ``BackendUnavailableError`` where the backend has
        no verify (``supports_verify``)."""
        if not self.supports_verify:
            raise BackendUnavailableError(
                f"{type(self).__name__} has no verify forward (per-position logits); "
                f"generate without speculation (speculate=0) on this backend.")
        if deltas is None or isinstance(deltas, Mapping):
            args = self._checked(ids, deltas, capture, from_empty=False)
            self.forward_calls += 1
            return self._verify(*args)
        runs = _runs(deltas, len(check_token_ids("ids", ids, self.identity.vocab_size)))
        ids, ops, layers = self._checked(ids, runs[0][1], capture, from_empty=False)
        checked = [(n, ops if i == 0 else self._checked_ops(d)) for i, (n, d) in enumerate(runs)]
        self.forward_calls += 1
        if len(checked) == 1:
            return self._verify(ids, ops, layers)
        return self._verify_runs(ids, checked, layers)

    def _verify(self, ids: list[int], deltas: dict[int, torch.Tensor],
                capture: frozenset[int]) -> ForwardResult:
        """The backend's verify on checked arguments (as ``_forward``, with ``all_logits``);
        called only where ``supports_verify`` is set, which a backend sets with this."""
        raise BackendUnavailableError(f"{type(self).__name__} sets supports_verify without _verify.")

    def _verify_runs(self, ids: list[int], runs: list[tuple[int, dict[int, torch.Tensor]]],
                     capture: frozenset[int]) -> ForwardResult:
        """The backend's verify with deltas that change along ``ids``: ``runs`` of (positions,
        checked deltas), in order, at least two. Here one ``_verify`` per run (each counted
        in ``forward_calls``), the cache back where it was if one fails; a backend that
        steers each position within one pass overrides it."""
        before, outs, start = self.seq_len, [], 0
        try:
            for i, (n, ops) in enumerate(runs):
                self.forward_calls += i > 0
                outs.append(self._verify(ids[start:start + n], ops, capture))
                start += n
        except BaseException:
            self._rewind(self.seq_len - before)
            raise
        every = torch.cat([o.all_logits for o in outs])  # [len(ids), vocab]
        hidden = {l: torch.cat([o.hidden[l] for o in outs]) for l in capture}
        return ForwardResult(every[-1], hidden, every)

    def step(self, token_id: int, deltas: LayerDeltas | None = None,
             capture: Collection[int] = ()) -> ForwardResult:
        """Feed one token; ``hidden`` rows are ``[1, hidden]``."""
        return self.forward([token_id], deltas, capture)

    def _checked(self, ids: Sequence[int], deltas: LayerDeltas | None, capture: Collection[int],
                 from_empty: bool) -> tuple[list[int], dict[int, torch.Tensor], frozenset[int]]:
        """The contract's checks; returns the arguments normalised for ``_forward``."""
        ids = check_token_ids("ids", ids, self.identity.vocab_size)
        layers = frozenset(check_layers(self.identity, capture, "capture"))
        check_room(self, len(ids), from_empty)
        # the cache may be emptied: measure the residual norms once per model
        return ids, self._checked_ops(deltas, measure=from_empty or self.seq_len == 0), layers

    def _checked_ops(self, deltas: LayerDeltas | None, measure: bool = False) -> dict[int, LayerOp]:
        """``deltas`` checked (layers, shapes, what this backend runs; then, after
        ``residual.measure`` where ``measure``, the bound on what is added, which needs the
        norms) and on this engine's device and dtype. While the caller passes the same
        mapping, its ops unwritten (the steering loop passes one mix's at every step until
        it changes), the checks are skipped and the same dict is returned: a backend may
        tell an unchanged step by identity (the ExLlamaV2 backend then skips refilling its
        graphs' buffers)."""
        memo = self._ops_memo
        if memo is not None and deltas is memo[0] and residual.same_deltas(deltas, memo[1]):
            if measure:
                residual.measure(self)
            return memo[2]
        checked = check_ops(self.identity, deltas)
        if not self.supports_interventions and any(isinstance(op, Intervention) for op in checked.values()):
            raise BackendUnavailableError(
                f"{type(self).__name__} only adds deltas (no ablation or clamp); steer it with "
                f"additions only, or use the transformers backend.")
        if measure:  # a forward: after the checks that need no norms, so a mistake costs none
            residual.measure(self)
        added = additions(checked)  # the bound applies to what is added
        if added:
            residual.check_delta_norms(self.identity, added, "deltas")
        device, dtype = self.device, self.dtype
        ops = {i: d if d.device == device and d.dtype == dtype else d.to(device, dtype)
               for i, d in checked.items()}
        self._ops_memo = (deltas, residual.deltas_key(deltas), ops) if ops else None
        return ops

    def _run(self, ids: list[int], deltas: dict[int, torch.Tensor],
             capture: frozenset[int]) -> ForwardResult:
        self.forward_calls += 1
        return self._forward(ids, deltas, capture)


class BatchEngine(Engine):
    """An engine that also runs a batch of sequences, in a batch cache of its own (the
    single-sequence cache of ``Engine`` is untouched by it, and the other way round).

    ``prefill_batch`` empties the batch cache and feeds one prompt per row (rows are
    numbered by their place in the call: 0..n-1; lengths may differ); ``step_batch`` feeds
    one token to every live row; ``drop_rows`` takes finished rows out (EOS, a stop
    string, their length) without changing the others' next logits. Each row has its own
    deltas (its own vectors, coefficients and layers, or none) and its own captures;
    results come back per row as the single-sequence ``ForwardResult`` (``logits``
    ``[vocab]``, ``hidden`` layer -> ``[n_fed, hidden]`` of that row only). A row's logits
    equal those of the same ids fed alone through ``forward``, within the backend's
    arithmetic. Checked here, for every backend, before any compute (``BadArgumentError``
    / ``ContextOverflowError``): each row's ids as ``forward``'s, each row's deltas as
    ``forward``'s (``[hidden]`` on known layers, within the norm bound), captures on known
    layers, every row's room in the context (prompt plus ``reserve`` tokens still to come),
    the rows' cache in memory (``max_batch_rows``); a step past a row's reserved room
    (``ContextOverflowError``). A ``step_batch`` that fails or is
    interrupted leaves the batch cache as it was; a ``prefill_batch`` that fails leaves
    it empty. Backends implement ``_prefill_batch``, ``_step_batch``, ``_drop_rows``,
    ``reset_batch``, ``batch_lengths``, ``_row_bytes`` and ``_free_bytes``."""

    supports_batch = True

    @property
    @abstractmethod
    def batch_lengths(self) -> dict[int, int]:
        """Live row -> positions it holds in the batch cache (empty: no batch)."""

    @abstractmethod
    def reset_batch(self) -> None:
        """Empty the batch cache."""

    @abstractmethod
    def _prefill_batch(self, prompts: list[list[int]], deltas: list[dict[int, torch.Tensor]],
                       capture: frozenset[int], capacity: int) -> list[ForwardResult]:
        """The backend's batch prefill on checked arguments (the batch cache empty); no row
        will hold more than ``capacity`` positions (its prompt and the tokens reserved)."""

    @abstractmethod
    def _step_batch(self, rows: list[int], tokens: list[int], deltas: list[dict[int, torch.Tensor]],
                    capture: frozenset[int]) -> list[ForwardResult]:
        """The backend's batch step: ``rows`` are exactly the live rows, in order."""

    @abstractmethod
    def _drop_rows(self, rows: frozenset[int]) -> None:
        """Take checked live ``rows`` out of the batch cache."""

    @abstractmethod
    def _row_bytes(self, length: int) -> int:
        """Memory one row of ``length`` positions needs (its cache and the working memory
        of its prefill), in bytes."""

    @abstractmethod
    def _free_bytes(self) -> int:
        """Memory free for the batch cache on the engine's device, in bytes."""

    def max_batch_rows(self, length: int) -> int:
        """How many rows of ``length`` positions each the free memory holds."""
        return self._free_bytes() // max(1, self._row_bytes(length))

    def check_batch(self, lengths: Sequence[int], what: str = "prompts") -> None:
        """Refuse, before any compute, a batch of rows holding ``lengths`` positions each
        (prompt plus tokens to come): an empty batch, a row over the context
        (``ContextOverflowError``), more rows than the memory holds (``BadArgumentError``
        naming the rows, the bytes needed and the free bytes)."""
        if not lengths:
            raise BadArgumentError(f"{what} is empty; give at least one row.")
        for row, n in enumerate(lengths):
            if n > self.max_seq_len:
                raise ContextOverflowError(
                    f"{what}[{row}] needs {n} positions (prompt and new tokens), over the "
                    f"context of {self.max_seq_len}; shorten it or lower max_new_tokens.")
        longest = max(lengths)
        need, free = len(lengths) * self._row_bytes(longest), self._free_bytes()
        if need > free:
            fit = max(1, free // max(1, self._row_bytes(longest)))
            raise BadArgumentError(
                f"{what}: {len(lengths)} rows of up to {longest} positions need about "
                f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB is free on {self.device}; "
                f"split them into batches of at most {fit} rows.")

    def prefill_batch(self, prompts: Sequence[Sequence[int]],
                      deltas: Sequence[LayerDeltas | None] | None = None,
                      capture: Collection[int] = (), reserve: int | Sequence[int] = 0
                      ) -> dict[int, ForwardResult]:
        """Empty the batch cache and feed ``prompts[i]`` as row ``i``, adding ``deltas[i]``
        (None: no deltas for any row) and capturing ``capture`` in every row; ``reserve``:
        the tokens each row will still be fed (one int for all, or one per row) (checked against the context and memory
        now). Returns row -> its ``ForwardResult`` (``hidden`` rows ``[len(prompts[i]),
        hidden]``). Checked first: a refused call keeps the batch cache."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise fail("prompts", prompts, "is not a list of rows", "pass a list of token-id lists")
        ids = [check_token_ids(f"prompts[{r}]", p, self.identity.vocab_size) for r, p in enumerate(prompts)]
        if deltas is not None and (not isinstance(deltas, Sequence) or len(deltas) != len(ids)):
            raise fail("deltas", deltas, f"is not a list of {len(ids)} (one per row)",
                       "pass one LayerDeltas or None per row, or None for no deltas")
        if isinstance(reserve, Sequence) and len(reserve) == len(ids):
            reserve = [check_int(f"reserve[{r}]", n, low=0, fix="pass the tokens still to come, >= 0")
                       for r, n in enumerate(reserve)]
        else:
            reserve = [check_int("reserve", reserve, low=0, fix="pass the tokens still to come "
                                 "(>= 0), one int or one per row")] * len(ids)
        lengths = [len(p) + n for p, n in zip(ids, reserve)]
        self.check_batch(lengths)
        layers = frozenset(check_layers(self.identity, capture, "capture"))
        if residual.known(self.identity) is None and self.seq_len == 0:
            residual.measure(self)  # the bound needs the norms; the single cache is empty anyway
        rows = self._checked_rows(range(len(ids)), deltas or [None] * len(ids), {})
        self.reset_batch()
        self._bounded_rows, self._batch_room = rows[1], dict(enumerate(lengths))
        self.forward_calls += 1
        try:
            out = self._prefill_batch(ids, rows[0], layers, max(lengths))
        except BaseException:
            self.reset_batch()
            raise
        return dict(enumerate(out))

    def step_batch(self, tokens: Mapping[int, int], deltas: Mapping[int, LayerDeltas | None] | None = None,
                   capture: Collection[int] = ()) -> dict[int, ForwardResult]:
        """Feed ``tokens[r]`` to every live row ``r`` (``tokens`` names exactly the live
        rows), adding ``deltas[r]`` (absent or None: none) and capturing ``capture``.
        Returns row -> ``ForwardResult`` (``hidden`` rows ``[1, hidden]``)."""
        lengths = self.batch_lengths
        if not isinstance(tokens, Mapping) or set(tokens) != set(lengths):
            raise fail("tokens", tokens, f"does not name exactly the live rows {sorted(lengths)}",
                       "pass {row: token id} for every live row (drop finished rows first)")
        rows = sorted(tokens)
        ids = check_token_ids("tokens", [tokens[r] for r in rows], self.identity.vocab_size)
        if deltas is not None and (not isinstance(deltas, Mapping) or not set(deltas) <= set(rows)):
            raise fail("deltas", deltas, "is not a mapping of live rows to deltas",
                       f"pass {{row: LayerDeltas or None}} for rows among {rows}")
        layers = frozenset(check_layers(self.identity, capture, "capture"))
        for r in rows:
            if lengths[r] + 1 > self._batch_room[r]:
                raise ContextOverflowError(
                    f"row {r} holds {lengths[r]} positions, all its prefill_batch reserved room for "
                    f"(its prompt and reserve); drop it (drop_rows), or reserve more tokens.")
        checked, self._bounded_rows = self._checked_rows(
            rows, [(deltas or {}).get(r) for r in rows], self._bounded_rows)
        self.forward_calls += 1
        return dict(zip(rows, self._step_batch(rows, ids, checked, layers)))

    def drop_rows(self, rows: Collection[int]) -> None:
        """Take finished ``rows`` (live rows of the batch) out of the batch cache; the other
        rows' caches and next logits stay as they were."""
        rows = frozenset(rows) if isinstance(rows, Collection) else rows
        live = self.batch_lengths
        if not isinstance(rows, frozenset) or not rows <= set(live):
            raise fail("rows", rows, "are not live rows of the batch", f"pass rows among {sorted(live)}")
        if rows:
            self._drop_rows(rows)

    _bounded_rows: dict = {}  # row -> the deltas key last found within the bound
    _batch_room: dict = {}  # row -> the positions its prefill_batch reserved (prompt + reserve)

    def _checked_rows(self, rows: Sequence[int], deltas: Sequence[LayerDeltas | None], bounded: dict
                      ) -> tuple[list[dict[int, torch.Tensor]], dict]:
        """Each row's deltas checked as ``forward`` checks them (the norm bound once per
        row and tensors), moved to the engine's device and dtype; and the new bound keys."""
        device, dtype, out, keys = self.device, self.dtype, [], {}
        for row, row_deltas in zip(rows, deltas):
            checked = check_deltas(self.identity, row_deltas)
            if checked and not residual.same_deltas(checked, bounded.get(row)):
                residual.check_delta_norms(self.identity, checked, f"deltas of row {row}")
            keys[row] = residual.deltas_key(checked) if checked else None
            out.append({i: d if d.device == device and d.dtype == dtype else d.to(device, dtype)
                        for i, d in checked.items()})
        return out, keys


def _runs(deltas: object, n: int) -> list[tuple[int, LayerDeltas | None]]:
    """Per-position deltas (one per id) as runs of the same value: (positions, deltas).
    ``BadArgumentError`` unless a sequence of ``n`` entries, each a mapping or None."""
    if (isinstance(deltas, (str, bytes)) or not isinstance(deltas, Sequence) or len(deltas) != n
            or not all(d is None or isinstance(d, Mapping) for d in deltas)):
        raise fail("deltas", deltas, f"is neither one LayerDeltas nor a list of {n} (one per id)",
                   "pass {layer: tensor} for every position, or one such mapping or None per id")
    runs: list[list] = []
    for d in deltas:
        if runs and runs[-1][1] is d:
            runs[-1][0] += 1
        else:
            runs.append([1, d])
    return [(count, d) for count, d in runs]


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
