"""The ExLlamaV2 engine and its loading (CUDA): EXL2, GPTQ and fp16 model folders of the
Llama and Qwen2 families.

``exllamav2`` (0.3.2) is imported lazily, only when an engine is loaded, so this module
imports on machines without CUDA.

How it runs:

- **Injection by a module loop, not ``Intervention`` hooks.** The engine walks exllamav2's
  modules itself (embedding, then attention + MLP per decoder block, then norm and head);
  the residual at the output of block ``i`` is the hidden state right after block ``i``'s
  MLP, where a delta is added in place and a capture is cloned (modules update the
  residual in place). ``Intervention`` wraps a module in a Python closure per call and
  only helps inside exllamav2's own generator, which we do not use; a loop we own can
  also be captured whole in a CUDA graph, which is where speed is won.
- **Decode steps of quantised models (EXL2/GPTQ) replay CUDA graphs.** One token's step
  calls the extension directly per block (``q_attn_forward_1`` with the position read
  from device memory, K/V written into the cache by ``index_copy_``, torch's
  variable-length flash attention with ``seqused_k`` over a 256-position bucket of the
  cache (4-5x faster here than SDPA with a mask, which runs one block per KV head),
  ``q_attn_forward_2``, ``q_mlp_forward_``). Nothing in it depends on a host-side
  position, so it is captured once per (bucket, delta layers, capture layers) and
  replayed: launch overhead, which dominates batch-1 decode on big GPUs, is paid once.
  Deltas (additions, or ``Intervention``s: ablation, clamp, add) and captures are static
  buffers the graph reads and writes: new coefficients, targets or bounds are copied into
  them, and only a new set of layers or shapes (``intervention.shape_of``) captures anew. A ``verify`` (a
  speculative draft: a few tokens, logits at every position) is the same pass over ``n``
  rows with causal attention among them, graphed per (bucket, ``n``, ...). Each engine runs
  its steps on its own CUDA stream without waiting on the host (``launches_async``), so
  the small model's mirroring step overlaps the big model's. fp16 folders (no quantised handles) run the
  module loop eagerly.
- **Fixes 0.3.2 needs on current torch/transformers**, applied here: without flash-attn,
  0.3.2's SDPA prefill passes no causal mask (it asks for a block-diagonal mask that is
  None), so each prefill chunk carries an explicit lower-right causal mask; transformers 5
  writes ``rope_parameters`` instead of ``rope_theta`` and exllamav2 would silently use
  10000, so the theta is read from either; torch's cuDNN attention re-plans for every new
  KV length (~40 ms each), so SDPA is kept off cuDNN during this backend's prefill.
- **Memory.** ``load_engines`` plans first (``plan.plan_memory``: nothing is allocated
  if the models do not fit), then caps torch's allocator at the budget. Token embeddings
  stay on the CPU, as in exllamav2 (token ids go through the CPU table, then one row is
  copied to the GPU).
"""
from __future__ import annotations

import os
from collections.abc import Collection, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from max_jupyter.engines.base import BatchEngine, ForwardResult, ModelIdentity, embedding_fingerprint
from max_jupyter.engines.exllamav2.batch import DirectBatch
from max_jupyter.engines.exllamav2.folder import import_exllamav2, read_raw_config
from max_jupyter.engines.exllamav2.plan import (
    BUCKET,
    MemoryPlan,
    cap_allocator,
    check_plan_args,
    measure_model,
    plan_memory,
    release,
    round_up,
)
from max_jupyter.engines.intervention import Intervention, apply, copy_into, shape_of
from max_jupyter.engines.intervention_kernel import apply_
from max_jupyter.tokenizer import Tokenizer

MAX_GRAPHS = 32  # direct-pass graphs kept per engine (oldest dropped first)
MAX_DIRECT_ROWS = 32  # the longest direct pass (a verify): exllamav2's quantised GEMM row limit
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # no cuDNN


def load_engines(folders: Sequence[tuple[str, str | os.PathLike]], max_vram_gb: float | None = None,
                 cache_tokens: int | None = None, max_input_len: int = 2048,
                 use_graphs: bool = True) -> tuple[list[ExLlamaV2Engine], MemoryPlan]:
    """Load ``(name, folder)`` models (e.g. big and small) into one VRAM budget.

    Plans first (``plan_memory``; nothing is allocated if it fails, and the plan is also
    checked against the memory free now), then caps torch's allocator (process-wide) at
    what it already holds plus the budget, loads each model and allocates its cache. If a
    load fails, every model is unloaded and the cap lifted before the error propagates.
    Returns the engines and the plan (``plan.table()`` is the memory report). Arguments
    and folders are checked first (``BadArgumentError``, ``ModelSourceError``).
    """
    max_vram_gb, cache_tokens, max_input_len = check_plan_args(max_vram_gb, cache_tokens, max_input_len)
    for _, folder in folders:
        read_raw_config(folder)
    exl, _, _ = import_exllamav2()
    measured = [measure_model(name, folder, max_input_len) for name, folder in folders]
    plan = plan_memory([m for m, _ in measured], max_vram_gb, cache_tokens, max_input_len)
    cap_allocator(plan)
    engines = []
    try:
        for (_name, folder), (_, model) in zip(folders, measured):
            model.config.max_seq_len = plan.cache_tokens
            model.load()
            cache = exl.ExLlamaV2Cache(model, batch_size=1, max_seq_len=plan.cache_tokens)
            engines.append(ExLlamaV2Engine(model, cache, Tokenizer.from_folder(folder), use_graphs))
    except BaseException:  # leave no half-loaded model and no allocator cap behind
        engines.clear()
        release([model for _, model in measured])
        raise
    return engines, plan


def load_pair(big: str | os.PathLike, small: str | os.PathLike, max_vram_gb: float | None = None,
              cache_tokens: int | None = None, max_input_len: int = 2048,
              use_graphs: bool = True) -> tuple[ExLlamaV2Engine, ExLlamaV2Engine, MemoryPlan]:
    """The big (writer) and small (watcher) engines in one budget, and their memory plan."""
    (b, s), plan = load_engines([("big", big), ("small", small)], max_vram_gb, cache_tokens,
                                max_input_len, use_graphs)
    return b, s, plan


class ExLlamaV2Engine(BatchEngine):
    """Engine over a loaded ``ExLlamaV2`` model and its fp16 ``ExLlamaV2Cache`` (batch 1, GPU 0).

    ``use_graphs``: replay CUDA graphs of decode steps and verify passes (quantised models
    only). Attribute ``direct``: one-token steps and verifies of up to ``MAX_DIRECT_ROWS``
    tokens take the direct path (on for quantised models on sm80+ GPUs); set it False to
    run them through exllamav2's own modules. Its batch cache is a ``DirectBatch``
    (engines/exllamav2/batch.py), on the direct path only (``supports_batch``).
    """

    supports_verify = True
    supports_interventions = True

    def __init__(self, model, cache, tokenizer: Tokenizer, use_graphs: bool = True):
        _, attn_mod, ext = import_exllamav2()
        from exllamav2.mlp import ExLlamaV2MLP

        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        cfg = model.config
        self._ext, self._none = ext.exllamav2_ext, ext.none_tensor
        self._params_cls = attn_mod.ExLlamaV2Attention.Params
        self._embedding = model.modules[0]
        attns = [m for m in model.modules if isinstance(m, attn_mod.ExLlamaV2Attention)]
        mlps = [m for m in model.modules if isinstance(m, ExLlamaV2MLP)]
        self._blocks = list(zip(attns, mlps))
        self._norm, self._head = model.modules[-2], model.modules[-1]
        self.device = torch.device(attns[0].device())
        self.dtype = torch.float16
        self.max_seq_len = cache.max_seq_len
        self._max_input_len = cfg.max_input_len
        self.identity = ModelIdentity(
            architecture=cfg.arch.arch_string, num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
            fingerprint=embedding_fingerprint(self._embedding.embedding.weight))
        self.quantised = all(a.q_handle is not None and m.q_handle is not None for a, m in self._blocks)
        self.direct = self.quantised and _has_flash_decode()
        self.use_graphs = use_graphs and self.direct
        # Static state of the direct path (read and written by its graphs); a pass of n
        # tokens (a step: 1, a verify: up to MAX_DIRECT_ROWS) uses the first n rows.
        hidden = cfg.hidden_size
        self._x = torch.zeros(1, MAX_DIRECT_ROWS, hidden, dtype=torch.float16, device=self.device)
        self._x_host = torch.zeros(1, MAX_DIRECT_ROWS, hidden, dtype=torch.float16).pin_memory()
        self._x_sent = torch.cuda.Event()  # the staging buffer's last upload
        self._pos = torch.zeros(1, dtype=torch.int32, device=self.device)  # first position written
        self._rows = torch.arange(MAX_DIRECT_ROWS, device=self.device)  # offsets from _pos
        self._cu_q: dict[int, torch.Tensor] = {}  # n -> [0, n] int32
        self._cu_k: dict[int, torch.Tensor] = {}  # bucket -> [0, bucket] int32
        self._delta_bufs: dict[tuple, torch.Tensor | Intervention] = {}  # (layer, shape_of) -> static copy
        self._filled: tuple = (None, frozenset())  # the deltas the static copies hold, their (layer, shape_of)s
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, dict[int, torch.Tensor]]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(self.device)  # direct passes run here, see _direct
        self._after_modules = True  # the last cache writes were on the caller's stream
        self._batch: DirectBatch | None = None

    @classmethod
    def load(cls, folder: str | os.PathLike, max_vram_gb: float | None = None,
             cache_tokens: int | None = None, max_input_len: int = 2048,
             use_graphs: bool = True) -> ExLlamaV2Engine:
        """Load one model folder (EXL2, GPTQ or fp16 safetensors + HF tokenizer files)."""
        (engine,), _ = load_engines([("model", folder)], max_vram_gb, cache_tokens, max_input_len,
                                    use_graphs)
        return engine

    @property
    def launches_async(self) -> bool:
        """Direct passes (steps, verifies) run on this engine's own stream without waiting
        (see ``_direct``)."""
        return self.direct

    @property
    def seq_len(self) -> int:
        return self.cache.current_seq_len

    def reset(self) -> None:
        self.cache.current_seq_len = 0

    def _rewind(self, n: int) -> None:
        self.cache.current_seq_len -= n

    def _unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm and head over ``hidden`` in chunks of ``max_input_len`` rows (the
        longest input exllamav2's head is sized for), on the caller's stream (which every
        direct pass's outputs are already ready on)."""
        chunks = hidden.contiguous().split(self._max_input_len)
        return torch.cat([self._logits(rows[None], all_rows=True)[0].float() for rows in chunks])

    def unload(self) -> None:
        """Free the weights, the cache and the graphs (the engine is unusable afterwards)."""
        self._graphs.clear()
        self.cache = self._batch = None
        self.model.unload()
        torch.cuda.empty_cache()

    @torch.inference_mode()
    def _forward(self, ids: list[int], deltas: dict[int, torch.Tensor],
                 capture: frozenset[int]) -> ForwardResult:
        """Arguments checked by ``Engine.forward`` (deltas already on this device, fp16)."""
        before = self.seq_len
        try:
            if len(ids) == 1 and self.direct:
                return self._direct(ids, deltas, capture, all_rows=False)
            return self._forward_modules(ids, deltas, capture)
        except BaseException as e:
            self._restore(before, e)
            raise

    @torch.inference_mode()
    def _verify(self, ids: list[int], deltas: dict[int, torch.Tensor],
                capture: frozenset[int]) -> ForwardResult:
        """``_forward`` with ``all_logits``: the direct path (graphed per length) for up to
        ``MAX_DIRECT_ROWS`` tokens where steps take it, else exllamav2's modules."""
        before = self.seq_len
        try:
            if len(ids) <= MAX_DIRECT_ROWS and self.direct:
                return self._direct(ids, deltas, capture, all_rows=True)
            return self._forward_modules(ids, deltas, capture, all_rows=True)
        except BaseException as e:
            self._restore(before, e)
            raise

    def _restore(self, seq_len: int, error: BaseException) -> None:
        """After a failed pass: the cache back to ``seq_len`` (positions past it are dead)."""
        self.cache.current_seq_len = seq_len
        if isinstance(error, torch.OutOfMemoryError):
            torch.cuda.empty_cache()  # leave the kernel usable: the cache is intact

    def _embed_cpu(self, ids: list[int]) -> torch.Tensor:
        """``[1, n, hidden]`` fp16 on the CPU, where exllamav2 keeps the embedding table."""
        return self._embedding.forward(torch.tensor([ids]))

    def _embed(self, ids: list[int]) -> torch.Tensor:
        """``[1, n, hidden]`` fp16 on the GPU."""
        return self._embed_cpu(ids).to(self.device)

    def _logits(self, x: torch.Tensor, all_rows: bool = False) -> torch.Tensor:
        """``[1, rows, vocab]`` fp16 logits of ``x`` ``[1, n, hidden]``: its last row, or all
        ``n`` with ``all_rows``."""
        rows = x if all_rows else x[:, -1:]
        return self._head.forward(self._norm.forward(rows))[..., :self.identity.vocab_size]

    def _forward_modules(self, ids: list[int], deltas: dict[int, torch.Tensor],
                         capture: frozenset[int], all_rows: bool = False, cache=None) -> ForwardResult:
        """exllamav2's modules in order, in chunks of ``max_input_len``, with a causal mask;
        ``all_rows`` keeps every position's logits (``all_logits``); ``cache``: another
        batch-1 cache than the engine's (a slot of the batch cache).

        Its attention calls torch SDPA, kept off cuDNN here (cuDNN re-plans for every new KV
        length, ~40 ms each); the setting is scoped to this call, not the process.
        """
        with sdpa_kernel(SDPA_BACKENDS):
            return self._run_modules(ids, deltas, capture, all_rows, self.cache if cache is None else cache)

    def _run_modules(self, ids: list[int], deltas: dict[int, torch.Tensor],
                     capture: frozenset[int], all_rows: bool, cache) -> ForwardResult:
        torch.cuda.current_stream().wait_stream(self._stream)  # earlier steps' cache writes
        self._after_modules = True
        captured: dict[int, list[torch.Tensor]] = {i: [] for i in capture}
        logits: list[torch.Tensor] = []  # [1, rows, vocab] per chunk
        for start in range(0, len(ids), self._max_input_len):
            part = ids[start:start + self._max_input_len]
            n, past = len(part), cache.current_seq_len
            x = self._embed(part)  # [1, n, hidden]
            params = self._params_cls(1, n, past, None, None)
            if n > 1:  # 0.3.2's SDPA path would otherwise attend to later positions
                params.block_diag_mask = torch.ones(n, past + n, dtype=torch.bool,
                                                    device=self.device).tril(past)  # [n, past + n]
            for i, (attn, mlp) in enumerate(self._blocks):
                x = attn.forward(x, cache=cache, attn_params=params, past_len=past)
                x = mlp.forward(x, cache=cache, attn_params=params, past_len=past)
                if i in deltas:
                    x = apply(x, deltas[i])  # an add, or an Intervention
                if i in capture:
                    captured[i].append(x[0].clone())  # [n, hidden]
            cache.current_seq_len = past + n
            if all_rows:
                logits.append(self._logits(x, all_rows=True))
        hidden = {i: torch.cat(rows) for i, rows in captured.items()}
        if not all_rows:
            return ForwardResult(logits=self._logits(x)[0, -1].float(), hidden=hidden)
        every = torch.cat(logits, 1)[0].float()  # [len(ids), vocab]
        return ForwardResult(logits=every[-1], hidden=hidden, all_logits=every)

    def _direct(self, ids: list[int], deltas: dict[int, torch.Tensor], capture: frozenset[int],
                all_rows: bool) -> ForwardResult:
        """``ids`` (one token, or a verify's few) through the direct path, replaying its CUDA
        graph once captured; ``all_rows`` returns every position's logits (``all_logits``).

        Runs on this engine's own CUDA stream and returns without waiting for the GPU, so
        two engines' steps (the big model's and the mirroring small model's) overlap on the
        GPU when issued back to back. The pass waits for the caller's stream only when it
        must (deltas the caller may just have computed, or cache writes of a prefill); the
        caller's stream waits for the pass's outputs.
        """
        caller = torch.cuda.current_stream()
        if deltas or self._after_modules:
            self._stream.wait_stream(caller)
        self._after_modules = False
        n, pos = len(ids), self.seq_len
        bucket = min(round_up(pos + n, BUCKET), self.max_seq_len)
        unchanged = deltas is self._filled[0]  # the same checked ops as the last pass (Engine._checked_ops)
        layer_shapes = self._filled[1] if unchanged else frozenset((i, shape_of(d)) for i, d in deltas.items())
        key = (bucket, n, all_rows, layer_shapes, capture)
        self._x_sent.synchronize()  # the previous upload has left the staging buffer
        self._x_host[:, :n].copy_(self._embed_cpu(ids))
        with torch.cuda.stream(self._stream):
            self._x[:, :n].copy_(self._x_host[:, :n], non_blocking=True)
            self._x_sent.record()
            self._pos.fill_(pos)
            if not unchanged:
                self._filled = (None, frozenset())  # until every buffer holds the new values
            for i, d in () if unchanged else deltas.items():  # new values into the static buffers: no re-capture
                static = self._delta_bufs.get((i, shape_of(d)))
                if static is None:  # read by the graphs from now on
                    static = self._delta_bufs[(i, shape_of(d))] = (
                        d.clone() if isinstance(d, torch.Tensor) else Intervention(*(  # contiguous: the kernel's layout
                            None if t is None else t.clone(memory_format=torch.contiguous_format) for t in
                            (d.add, d.ablate, d.targets, d.clamp, d.low, d.high))))
                else:
                    copy_into(static, d)
            self._filled = (deltas, layer_shapes)
            if key in self._graphs:
                graph, logits, hidden = self._graphs[key]
                graph.replay()
            else:
                logits, hidden = self._decode(*key)
            result = self._result(logits, hidden, all_rows)
        if self.use_graphs and key not in self._graphs:
            self._capture_graph(key)  # after an eager run of the same pass: warmed up
        outputs = (result.logits, result.all_logits, *result.hidden.values())
        for t in (t for t in outputs if t is not None):
            t.record_stream(caller)
        caller.wait_stream(self._stream)
        self.cache.current_seq_len = pos + n
        return result

    @staticmethod
    def _result(logits: torch.Tensor, hidden: dict[int, torch.Tensor], all_rows: bool) -> ForwardResult:
        """A ``ForwardResult`` copied out of a pass's static outputs (``logits`` ``[1, rows,
        vocab]`` fp16), so the next replay cannot overwrite it."""
        rows = logits[0].float()  # [rows, vocab]
        return ForwardResult(logits=rows[-1], hidden={i: h.clone() for i, h in hidden.items()},
                             all_logits=rows if all_rows else None)

    def _capture_graph(self, key: tuple) -> None:
        """Capture the direct pass for ``key``; capturing runs nothing, so the cache is untouched."""
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.pop(next(iter(self._graphs)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            logits, hidden = self._decode(*key)
        self._graphs[key] = (graph, logits, hidden)

    def _decode(self, bucket: int, n: int, all_rows: bool, delta_layers: Collection[tuple[int, tuple]],
                capture: Collection[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The direct pass of ``n`` tokens on the static buffers: ``self._x[:, :n]`` (the
        embedded tokens, updated in place as the residual), ``self._pos`` (the first one's
        position) and ``self._delta_bufs`` (``delta_layers``: (layer, ``shape_of``) pairs).

        Returns ``[1, rows, vocab]`` fp16 logits (the last row, or all ``n`` with
        ``all_rows``) and layer -> ``[n, hidden]`` captures. Writes K/V at ``pos .. pos + n - 1``;
        attention (flash, variable length, causal within the ``n`` new tokens) reads the
        first ``pos + n`` cached positions, launched over the first ``bucket``.
        """
        ext, none, x = self._ext, self._none, self._x[:, :n]
        positions = self._pos.long() + self._rows[:n]  # [n]
        used = self._pos + n  # [1] int32: keys to attend to
        if bucket not in self._cu_k:  # (the eager run of a key always precedes its capture)
            self._cu_k[bucket] = torch.tensor([0, bucket], dtype=torch.int32, device=self.device)
        if n not in self._cu_q:
            self._cu_q[n] = torch.tensor([0, n], dtype=torch.int32, device=self.device)
        constants = self.model.get_device_context(self._blocks[0][0].device_idx)
        hidden: dict[int, torch.Tensor] = {}
        ops = {i: self._delta_bufs[(i, shape)] for i, shape in delta_layers}
        for i, (attn, mlp) in enumerate(self._blocks):
            heads, kv_heads, head_dim = attn.num_attention_heads, attn.num_key_value_heads, attn.head_dim
            q = torch.empty(1, n, heads * head_dim, dtype=torch.float16, device=self.device)
            k = torch.empty(1, n, kv_heads * head_dim, dtype=torch.float16, device=self.device)
            v = torch.empty_like(k)
            ext.q_attn_forward_1(attn.q_handle, x, 1, n, -1, self._pos, q, k, v,
                                 constants.sin[attn.rope_index], constants.cos[attn.rope_index], [], none)
            k_cache, v_cache = self.cache.key_states[attn.layer_idx], self.cache.value_states[attn.layer_idx]
            k_cache.index_copy_(1, positions, k.view(1, n, kv_heads, head_dim))  # cache: [1, seq, kv_heads, dim]
            v_cache.index_copy_(1, positions, v.view(1, n, kv_heads, head_dim))
            out = torch.ops.aten._flash_attention_forward(
                q.view(n, heads, head_dim), k_cache[0, :bucket], v_cache[0, :bucket],
                self._cu_q[n], self._cu_k[bucket], n, bucket, 0.0, n > 1, False,
                scale=attn.scaling, seqused_k=used)[0]  # [n, heads, dim]; causal: bottom-right
            ext.q_attn_forward_2(attn.q_handle, x, out.view(1, n, heads * head_dim), 1, n, [], none)
            ext.q_mlp_forward_(mlp.q_handle, x, [], none)
            if attn.archparams.clamp_hidden_states:
                x.clamp_(-65504, 65504)
            if i in ops:
                op = ops[i]
                if isinstance(op, torch.Tensor):
                    x.add_(op)
                else:  # ablation, clamp and add in the static buffers: one launch (intervention_kernel.py)
                    apply_(x[0], op)
            if i in capture:
                hidden[i] = x[0].clone()  # [n, hidden]
        return self._logits(x, all_rows), hidden


    # The batch cache (a DirectBatch) -------------------------------------------------------

    @property
    def supports_batch(self) -> bool:
        """Batches run on the direct path (quantised models on sm80+ GPUs)."""
        return self.direct

    @property
    def batch_lengths(self) -> dict[int, int]:
        batch = self._batch
        return {r: batch.lengths[r] for r in batch.live} if batch is not None else {}

    def reset_batch(self) -> None:
        """Free the batch cache and its graphs and give their memory back to the device: a
        later batch of other rows could not reuse those blocks and would add to torch's
        reserve (over the plan) instead. Side effect: ``torch.cuda.empty_cache()``."""
        if self._batch is not None:
            self._batch = None
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _prefill_batch(self, prompts: list[list[int]], deltas: list[dict[int, torch.Tensor]],
                       capture: frozenset[int], capacity: int) -> list[ForwardResult]:
        self._batch = DirectBatch(self, len(prompts), capacity)
        return self._batch.prefill(prompts, deltas, capture)

    @torch.inference_mode()
    def _step_batch(self, rows: list[int], tokens: list[int], deltas: list[dict[int, torch.Tensor]],
                    capture: frozenset[int]) -> list[ForwardResult]:
        try:
            return self._batch.step(tokens, deltas, capture)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()  # the batch is as before: its lengths move only on success
            raise

    def _drop_rows(self, rows: frozenset[int]) -> None:
        self._batch.live = [r for r in self._batch.live if r not in rows]

    def _row_bytes(self, length: int) -> int:
        return DirectBatch.row_bytes(self, length)

    def _free_bytes(self) -> int:
        """Free device memory, within the cap ``load_engines`` put on torch's allocator
        (memory torch holds but does not use counts as free)."""
        free, total = torch.cuda.mem_get_info(self.device)
        allocated, reserved = torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(self.device)
        cap = fraction * total
        return max(0, int(min(free + reserved - allocated, cap - allocated)))


def _has_flash_decode() -> bool:
    """The direct decode path needs torch's variable-length flash attention (sm80+, ``seqused_k``)."""
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    return torch.cuda.get_device_capability() >= (8, 0) and "seqused_k" in schema
