"""Reference backend on HF transformers (CPU, or CUDA where present).

Deltas (additions or ``Intervention``s) and captures go through one forward hook per decoder block, registered once; a
hook does nothing unless the current forward asked for its layer. The KV cache is a
``DynamicCache``; ``_rewind`` crops it.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Collection

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from max_jupyter.engines.base import BatchEngine, ForwardResult, LayerDeltas, ModelIdentity, embedding_fingerprint
from max_jupyter.engines.cpu_linear import CALIBRATION, can_pack, pack_linears, quantize_linears
from max_jupyter.engines.intervention import apply
from max_jupyter.engines.padded import PaddedBatch
from max_jupyter.models import resolve_hf_folder
from max_jupyter.tokenizer import Tokenizer
from max_jupyter.validation import (
    INT8,
    check_device,
    check_dtype,
    check_int8_device,
    check_max_seq_len,
    default_device,
)

Runs = tuple[tuple[slice, LayerDeltas], ...]
"""The steering of a running pass: spans of its positions, each with its ops."""


def _spans(deltas: LayerDeltas | list[tuple[int, LayerDeltas]], n: int) -> Runs:
    """``deltas`` (one set for all ``n`` positions, or runs of (positions, deltas)) as spans;
    empty where nothing steers."""
    if not isinstance(deltas, list):
        return ((slice(0, n), deltas),) if deltas else ()
    spans, start = [], 0
    for count, ops in deltas:
        spans.append((slice(start, start + count), ops))
        start += count
    return tuple(spans)


class TransformersEngine(BatchEngine):
    """Engine over a HF ``*ForCausalLM`` whose decoder blocks are ``model.model.layers``;
    its batch cache is a ``PaddedBatch`` (engines/padded.py)."""

    supports_verify = True
    supports_interventions = True

    def __init__(self, model: PreTrainedModel, tokenizer: Tokenizer, max_seq_len: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        cfg = model.config
        self.max_seq_len = check_max_seq_len(max_seq_len, cfg.max_position_embeddings)
        self.identity = ModelIdentity(
            architecture=(cfg.architectures or [type(model).__name__])[0],
            num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            fingerprint=embedding_fingerprint(model.get_input_embeddings().weight))
        self.layers = model.model.layers
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._cache = DynamicCache(config=cfg)
        self._runs: Runs = ()
        self._steered: frozenset[int] = frozenset()
        self._capture: Collection[int] = ()
        self._captured: dict[int, torch.Tensor] = {}
        self._batch: PaddedBatch | None = None
        self._batched = False  # the running forward is a batch's: captures keep every row
        for i, layer in enumerate(self.layers):
            layer.register_forward_hook(self._hook(i))

    @classmethod
    def load(cls, source: str | os.PathLike | None = None, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, max_seq_len: int | None = None) -> TransformersEngine:
        """Load ``source`` (see ``models.resolve_hf_folder``; None = embedded SmolLM2).

        Default device: CUDA if available, else CPU; default dtype: fp16 on CUDA, fp32 on CPU
        (whose linear layers then run on oneDNN-packed weights: engines/cpu_linear.py).
        ``dtype="int8"`` (CPU only): fp32 with int8 linear layers (``Int8Linear``: about 4
        times fewer bytes a step, each product within about 1-2% of fp32's; greedy text may change).
        ``max_seq_len``: an int >= 1 (capped at the model's positions) or None for all of
        them. ``device``, ``dtype`` and ``max_seq_len`` are checked before anything is read
        or converted (``BadArgumentError``).
        """
        device = default_device(check_device(device))
        dtype = check_dtype(dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
        check_int8_device(dtype, device)
        max_seq_len = check_max_seq_len(max_seq_len)  # capped at the model's positions once loaded
        folder = resolve_hf_folder(source)
        weights = torch.float32 if dtype == INT8 else dtype
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=weights).to(device)
        tokenizer = Tokenizer.from_folder(folder)
        if dtype == INT8:
            prompt, reply = CALIBRATION
            quantize_linears(model, tokenizer.chat(prompt) + tokenizer.encode(reply))
        elif can_pack(model):  # fp32 on the CPU: a few rows cost about one (engines/cpu_linear.py)
            pack_linears(model)
        return cls(model, tokenizer, max_seq_len)

    def _hook(self, i: int):
        def hook(module, args, output):
            steered = i in self._steered
            if not steered and i not in self._capture:
                return None
            hidden = output[0] if isinstance(output, tuple) else output  # [1, n, hidden]
            if steered:
                hidden = self._steer(i, hidden)
            if i in self._capture:
                self._captured[i] = (hidden if self._batched else hidden[0]).detach().clone()  # [n, hidden]
            if not steered:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def _steer(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[rows, n, hidden]`` with the running pass's ops at layer ``i`` (an
        add, or an Intervention): one op for all positions, or each run of positions its own."""
        runs = self._runs
        if len(runs) == 1:
            return apply(hidden, runs[0][1][i])
        return torch.cat([apply(hidden[:, span], ops[i]) if i in ops else hidden[:, span]
                          for span, ops in runs], 1)

    def _set_steering(self, runs: Runs) -> None:
        """Steer the next pass with ``runs`` (empty: not at all)."""
        self._runs = runs
        self._steered = frozenset(layer for _, ops in runs for layer in ops)

    @property
    def seq_len(self) -> int:
        return self._cache.get_seq_length()

    def reset(self) -> None:
        self._cache = DynamicCache(config=self.model.config)

    def _rewind(self, n: int) -> None:
        self._truncate(self.seq_len - n)

    def _truncate(self, length: int) -> None:
        """Cut every cache layer to ``length`` positions (layers may differ after an
        interrupted forward, so each is cut by its own excess)."""
        if length == 0:
            self.reset()
            return
        for layer in self._cache.layers:
            excess = layer.get_seq_length() - length
            if excess > 0:
                layer.crop(-excess)

    def _forward(self, ids: list[int], deltas: dict[int, torch.Tensor],
                 capture: frozenset[int]) -> ForwardResult:
        logits, captured = self._pass(ids, deltas, capture, keep=1)
        return ForwardResult(logits=logits[-1], hidden=captured)

    def _verify(self, ids: list[int], deltas: dict[int, torch.Tensor],
                capture: frozenset[int]) -> ForwardResult:
        logits, captured = self._pass(ids, deltas, capture, keep=len(ids))
        return ForwardResult(logits=logits[-1], hidden=captured, all_logits=logits)

    def _verify_runs(self, ids: list[int], runs: list[tuple[int, dict[int, torch.Tensor]]],
                     capture: frozenset[int]) -> ForwardResult:
        """One pass, each run of positions steered by its own deltas (the hook slices them)."""
        logits, captured = self._pass(ids, runs, capture, keep=len(ids))
        return ForwardResult(logits=logits[-1], hidden=captured, all_logits=logits)

    def _unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(self.model.model.norm(hidden)).float()

    @torch.inference_mode()
    def _pass(self, ids: list[int], deltas: dict[int, torch.Tensor] | list[tuple[int, dict]],
              capture: frozenset[int], keep: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One forward appending ``ids`` with ``deltas`` (one set for all, or runs of
        (positions, deltas) along ``ids``); the logits of the last ``keep`` positions
        (``[keep, vocab]`` float32) and the captured rows. Restores the cache if it fails."""
        before = self.seq_len
        self._set_steering(_spans(deltas, len(ids)))
        self._capture, self._captured = capture, {}
        try:
            out = self.model(torch.tensor([ids], device=self.device),
                             use_cache=True, logits_to_keep=keep, **{self._cache_kw: self._cache})
        except BaseException:
            self._truncate(before)  # undo a partly written cache
            raise
        finally:
            self._set_steering(())
            self._capture = ()
        captured, self._captured = self._captured, {}
        return out.logits[0].float(), captured

    # The batch cache (a PaddedBatch) ------------------------------------------------------

    @property
    def batch_lengths(self) -> dict[int, int]:
        batch = self._batch
        return dict(zip(batch.rows, batch.lengths)) if batch is not None else {}

    def reset_batch(self) -> None:
        self._batch = None

    def _prefill_batch(self, prompts: list[list[int]], deltas: list[dict[int, torch.Tensor]],
                       capture: frozenset[int], capacity: int) -> list[ForwardResult]:
        ids, positions = PaddedBatch.inputs(prompts, self.device)
        batch = PaddedBatch(DynamicCache(config=self.model.config), list(range(len(prompts))),
                            [len(p) for p in prompts], self.device)
        logits, captured = self._batch_pass(batch, ids, positions, batch.mask, deltas, capture)
        self._batch = batch
        return [ForwardResult(logits=logits[i], hidden={l: h[i, h.shape[1] - len(p):] for l, h in captured.items()})
                for i, p in enumerate(prompts)]

    def _step_batch(self, rows: list[int], tokens: list[int], deltas: list[dict[int, torch.Tensor]],
                    capture: frozenset[int]) -> list[ForwardResult]:
        batch = self._batch
        ids, positions, mask = batch.step_inputs(tokens)
        try:
            logits, captured = self._batch_pass(batch, ids, positions, mask, deltas, capture)
        except BaseException:
            batch.restore()  # undo a partly written cache
            raise
        batch.stepped(mask)
        return [ForwardResult(logits=logits[i], hidden={l: h[i] for l, h in captured.items()})
                for i in range(len(rows))]

    def _drop_rows(self, rows: frozenset[int]) -> None:
        self._batch.drop(rows)

    @torch.inference_mode()
    def _batch_pass(self, batch: PaddedBatch, ids: torch.Tensor, positions: torch.Tensor,
                    mask: torch.Tensor, deltas: list[dict[int, torch.Tensor]], capture: frozenset[int]
                    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One forward of the batch: ``[rows, vocab]`` float32 logits after each row's last
        position, and layer -> ``[rows, n, hidden]`` captures. Each row's deltas go into a
        ``[rows, 1, hidden]`` buffer per steered layer, added by the same block hook."""
        buffers = batch.row_buffers(deltas, self.identity.hidden_size, self.device, self.dtype)
        self._set_steering(_spans(buffers, ids.shape[1]))
        self._capture, self._captured, self._batched = capture, {}, True
        try:
            out = self.model(ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: batch.cache})
        finally:
            self._set_steering(())
            self._capture, self._batched = (), False
        captured, self._captured = self._captured, {}
        return out.logits[:, -1].float(), captured

    def _row_bytes(self, length: int) -> int:
        cfg = self.model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        size = self.dtype.itemsize
        cache = 2 * cfg.num_hidden_layers * kv_heads * head_dim * length * size
        scores = heads * length * length * 4  # one layer's attention weights in the prefill (fp32 at most)
        activations = length * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * size
        return cache + scores + activations + cfg.vocab_size * 4

    def _free_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        import psutil

        return psutil.virtual_memory().available
