"""The ExLlamaV3 engine and its loading (CUDA): EXL3 model folders of the Llama and Qwen2
families through exllamav3 1.6.5.

``exllamav3`` is imported lazily, only when an engine is loaded, so this module imports on
machines without CUDA.

How it runs (docs/gpu.md has the measurements):

- **exllamav3's own module loop, driven here.** A forward walks ``model.fwd_modules`` as
  ``Model.forward_ls`` does (embedding on the CPU, ``TransformerBlock``s, norm, head) with
  the same ``params`` dict, so every module takes its fast path: the per-module CUDA graphs
  exllamav3 replays for batch-1 decode (attention block, fused MLP), its paged flash
  attention over the cache, and the deferred residual add (a block leaves its MLP output
  pending and the next block's input norm adds it, fused). The residual at the output of
  block ``i`` is ``x + pending`` there; a delta is added to ``x`` in place (the same sum,
  so steering keeps the deferral), a capture turns the deferral off at its layer and clones.
  An ``Intervention`` (ablation, clamp) turns the deferral off at its layer too (it projects
  the whole residual) and is applied to the fp32 residual in one launch
  (``intervention_kernel.apply_``).
- **No whole-step CUDA graph.** exllamav3 builds each step's attention parameters on the
  host (``cache_seqlens``, positions) and copies them to the device, and its modules
  replay their own graphs; capturing ``model.forward`` fails ("Cannot copy between CPU and
  CUDA tensors during CUDA graph capture"). The loop is therefore eager, as exllamav3's
  own generator is, and steering costs one in-place add per steered layer.
- **The cache** is exllamav3's paged ``Cache`` (fp16, or quantised to ``cache_bits``) used
  as one sequence: ``batch_shape (1, capacity)`` and ``past_len`` = the cached length, so
  a rewind only lowers the length (later positions are overwritten by the next pass).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from max_jupyter.engines.base import Engine, ForwardResult, ModelIdentity, embedding_fingerprint
from max_jupyter.engines.exllamav2.plan import (
    MemoryPlan,
    cap_allocator,
    plan_memory,
    release,
)
from max_jupyter.engines.exllamav3.folder import import_exllamav3
from max_jupyter.engines.exllamav3.plan import check_cache_bits, measure_model
from max_jupyter.engines.intervention_kernel import apply_
from max_jupyter.errors import BackendUnavailableError
from max_jupyter.tokenizer import Tokenizer

PAGE = 256  # exllamav3's cache page (positions)


def load_engines(folders: Sequence[tuple[str, str | os.PathLike]], max_vram_gb: float | None = None,
                 cache_tokens: int | None = None, max_input_len: int = 2048,
                 cache_bits: int | None = None) -> tuple[list[ExLlamaV3Engine], MemoryPlan]:
    """Load ``(name, folder)`` EXL3 models (e.g. big and small) into one VRAM budget.

    Plans first (``plan_memory``: nothing is allocated if it fails, and the plan is also
    checked against the memory free now), then caps torch's allocator (process-wide) at
    what it already holds plus the budget, loads each model with a cache of the planned
    capacity (fp16, or ``cache_bits`` 2..8 quantised). If a load fails, every model is
    unloaded and the cap lifted before the error propagates. Arguments and folders are
    checked first (``BadArgumentError``, ``ModelSourceError``).
    """
    cache_bits = check_cache_bits(cache_bits)
    memories = [measure_model(name, folder, max_input_len, cache_bits) for name, folder in folders]
    plan = plan_memory(memories, max_vram_gb, cache_tokens, max_input_len)
    exl3 = import_exllamav3()
    cap_allocator(plan)
    models, engines = [], []
    try:
        for _name, folder in folders:
            model = exl3.Model.from_config(exl3.Config.from_directory(str(folder)))
            models.append(model)
            layer = ({} if cache_bits is None else
                     dict(layer_type=exl3.CacheLayer_quant, k_bits=cache_bits, v_bits=cache_bits))
            pages = plan.cache_tokens // PAGE * PAGE  # exllamav3's cache is whole pages
            cache = exl3.Cache(model, max_num_tokens=pages, **layer)
            # one device: exllamav3's autosplit would run measuring forwards and reset the cap
            model.load(device="cuda:0", progressbar=False)
            engines.append(ExLlamaV3Engine(model, cache, Tokenizer.from_folder(folder), max_input_len))
    except BaseException:  # leave no half-loaded model and no allocator cap behind
        engines.clear()
        release(models)
        raise
    return engines, plan


def load_pair(big: str | os.PathLike, small: str | os.PathLike, max_vram_gb: float | None = None,
              cache_tokens: int | None = None, max_input_len: int = 2048,
              cache_bits: int | None = None) -> tuple[ExLlamaV3Engine, ExLlamaV3Engine, MemoryPlan]:
    """The big (writer) and small (watcher) engines in one budget, and their memory plan."""
    (b, s), plan = load_engines([("big", big), ("small", small)], max_vram_gb, cache_tokens,
                                max_input_len, cache_bits)
    return b, s, plan


class ExLlamaV3Engine(Engine):
    """Engine over a loaded exllamav3 ``Model`` and its ``Cache`` (batch 1, GPU 0).

    The residual stream is fp32 (exllamav3's), so ``dtype`` is float32: deltas are added and
    captures returned in fp32. ``max_input_len``: the longest chunk one pass feeds (longer
    prefills run in chunks).
    """

    supports_verify = True
    supports_interventions = True
    use_graphs = True  # exllamav3's modules capture their graphs on first use

    def __init__(self, model, cache, tokenizer: Tokenizer, max_input_len: int = 2048):
        from exllamav3.modules import TransformerBlock

        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        mods = [m for m, _, _ in model.fwd_modules]
        blocks = mods[1:-2]
        if not blocks or not all(type(b) is TransformerBlock for b in blocks):
            raise BackendUnavailableError(
                f"{type(model).__name__}'s modules are not embedding, transformer blocks, norm and "
                f"head; the ExLlamaV3 backend cannot drive this architecture.")
        if not hasattr(mods[0].embedding, "weight"):
            raise BackendUnavailableError(
                "this EXL3 folder's token embeddings are quantised (convert_model -eb); the "
                "ExLlamaV3 backend needs the fp16 table (for the model's identity): convert without -eb.")
        self._embedding, self._blocks = mods[0], blocks
        self._norm, self._head = mods[-2], mods[-1]
        cfg = model.config
        self.device = torch.device(blocks[0].device)
        self.dtype = torch.float32
        self.max_seq_len = cache.max_num_tokens
        self._max_input_len = max_input_len
        self._len = 0
        self.identity = ModelIdentity(
            architecture=cfg.arch_string, num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
            fingerprint=embedding_fingerprint(self._embedding.embedding.weight))

    @classmethod
    def load(cls, folder: str | os.PathLike, max_vram_gb: float | None = None,
             cache_tokens: int | None = None, max_input_len: int = 2048,
             cache_bits: int | None = None) -> ExLlamaV3Engine:
        """Load one EXL3 model folder (safetensors + config.json + HF tokenizer files)."""
        (engine,), _ = load_engines([("model", folder)], max_vram_gb, cache_tokens, max_input_len,
                                    cache_bits)
        return engine

    @property
    def seq_len(self) -> int:
        return self._len

    def reset(self) -> None:
        self._len = 0

    def _rewind(self, n: int) -> None:
        self._len -= n

    def unload(self) -> None:
        """Free the weights and the cache (the engine is unusable afterwards)."""
        self.model.unload()
        self.cache = None
        torch.cuda.empty_cache()

    def _params(self, past: int) -> dict:
        """exllamav3's ``params`` for a pass after ``past`` cached positions."""
        return {"attn_mode": "flash_attn", "cache": self.cache, "past_len": past,
                "batch_shape": (1, self.max_seq_len)}

    def _unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm and head over ``hidden`` in chunks of ``max_input_len`` rows."""
        params: dict = {}
        return torch.cat([self._logits(rows[None].contiguous(), params)[0].float()
                          for rows in hidden.split(self._max_input_len)])

    def _logits(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """``[1, rows, vocab]`` fp16 logits of the residual ``x`` ``[1, rows, hidden]``."""
        for module in (self._norm, self._head):
            x = module.forward(module.prepare_for_device(x, params), params)
        return x[..., :self.identity.vocab_size]

    @torch.inference_mode()
    def _forward(self, ids: list[int], deltas: dict[int, torch.Tensor],
                 capture: frozenset[int]) -> ForwardResult:
        return self._run_blocks(ids, deltas, capture, all_rows=False)

    @torch.inference_mode()
    def _verify(self, ids: list[int], deltas: dict[int, torch.Tensor],
                capture: frozenset[int]) -> ForwardResult:
        return self._run_blocks(ids, deltas, capture, all_rows=True)

    def _run_blocks(self, ids: list[int], deltas: dict[int, torch.Tensor], capture: frozenset[int],
                    all_rows: bool) -> ForwardResult:
        """``ids`` through the modules in chunks of ``max_input_len``; ``all_rows`` keeps every
        position's logits. The cached length moves only once every chunk has run, so a
        failed pass leaves the cache as it was."""
        captured: dict[int, list[torch.Tensor]] = {i: [] for i in capture}
        logits: list[torch.Tensor] = []
        past = self._len
        try:
            for start in range(0, len(ids), self._max_input_len):
                part = ids[start:start + self._max_input_len]
                last = start + len(part) == len(ids)
                x, params = self._blocks_pass(part, past + start, deltas, capture, captured)
                if all_rows or last:
                    logits.append(self._logits(x if all_rows else x[:, -1:].contiguous(), params))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()  # leave the kernel usable: the cache length is unchanged
            raise
        self._len = past + len(ids)
        # one chunk (every step): no concatenation, one kernel launch fewer each
        hidden = {i: rows[0] if len(rows) == 1 else torch.cat(rows) for i, rows in captured.items()}
        every = (logits[0] if len(logits) == 1 else torch.cat(logits, 1))[0].float()  # [rows, vocab]
        return ForwardResult(logits=every[-1], hidden=hidden, all_logits=every if all_rows else None)

    def _blocks_pass(self, part: list[int], past: int, deltas: dict[int, torch.Tensor],
                     capture: frozenset[int], captured: dict[int, list[torch.Tensor]]):
        """One chunk through the embedding and every block (``forward_ls``'s loop with a
        delta add, an ``Intervention`` and a capture at block outputs); returns the residual
        ``[1, n, hidden]`` fp32 and the pass's ``params``. A block defers its residual add to
        the next block's norm unless its output is captured or intervened on (or it is the
        last)."""
        params = self._params(past)
        x = self.model.prepare_inputs(torch.tensor([part]), params)
        x = self._embedding.forward(self._embedding.prepare_for_device(x, params), params)
        last = len(self._blocks) - 1
        for i, block in enumerate(self._blocks):
            params["layer_instance"] = 0
            x = block.prepare_for_device(x, params)
            op = deltas.get(i)
            plain = op is None or isinstance(op, torch.Tensor)  # an add commutes with the pending add
            params["resid_defer"] = i < last and i not in capture and plain
            x = block.forward(x, params)
            if not plain:  # ablation and clamp project the whole residual: nothing pending (one launch)
                apply_(x[0], op)
            elif op is not None:
                x.add_(op)  # the pending MLP output (if deferred) is added by the next block
            if i in capture:
                captured[i].append(x[0].clone())  # [n, hidden]
        params.pop("resid_defer", None)
        pending = params.pop("resid_pending", None)
        if pending is not None:
            x += pending
        return x, params
