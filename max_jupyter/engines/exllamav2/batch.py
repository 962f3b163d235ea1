"""``DirectBatch``: the ExLlamaV2 engine's batch cache and its batched decode.

The batch cache is one fp16 ``ExLlamaV2Cache`` of ``batch_size = rows`` (row ``i`` in slot
``i``), allocated by ``prefill_batch`` for the longest row's prompt and reserve (rounded
up to ``BUCKET``) and freed by ``reset_batch``; it is not the engine's batch-1 cache.

- **Prefill**: row by row through exllamav2's modules (the engine's own prefill), each
  into its slot through a batch-1 cache object whose tensors are views of that slot.
- **Decode**: one direct pass over the live rows, as the batch-1 direct path but with a
  row per sequence: ``q_attn_forward_1`` with ``batch_size = rows`` and each row's position
  from device memory (``past_len = -1``: rope per row), K/V written at ``(slot, position)``,
  torch's variable-length flash attention with each row's keys starting at its slot
  (``cu_seqlens_k``) and ``seqused_k`` = its length, launched over a ``BUCKET``-rounded
  window; ``q_attn_forward_2`` and ``q_mlp_forward_`` over all rows at once. Each steered
  layer adds a ``[rows, 1, hidden]`` buffer (a row's delta, zeros for none). Nothing in it
  depends on a host-side value, so it is captured as a CUDA graph per (bucket, live rows,
  delta layers, capture layers) and replayed; more than ``CHUNK`` live rows run as several
  passes of at most ``CHUNK``. Finished rows leave by leaving the list of
  live slots (their slots stay allocated until the next prefill).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import max_jupyter.engines.residual as residual
from max_jupyter.engines.base import ForwardResult
from max_jupyter.engines.exllamav2.folder import import_exllamav2
from max_jupyter.engines.exllamav2.plan import BUCKET, round_up

CHUNK = 32  # rows per decode pass: exllamav2's quantised GEMM takes up to 32 rows (more go through cuBLAS)

if TYPE_CHECKING:
    from max_jupyter.engines.exllamav2.engine import ExLlamaV2Engine


class DirectBatch:
    """A batch of ``rows`` sequences of up to ``capacity`` positions for ``engine``."""

    def __init__(self, engine: ExLlamaV2Engine, rows: int, capacity: int):
        exl, _, _ = import_exllamav2()
        self.engine = engine
        self.capacity = min(round_up(capacity, BUCKET), round_up(engine.max_seq_len, BUCKET))
        self.cache = exl.ExLlamaV2Cache(engine.model, batch_size=rows, max_seq_len=self.capacity, lazy=True)
        # Every layer's K and V as views of one allocation: per-layer tensors of a few MiB
        # would share torch's 20 MiB segments and leave the rest of them reserved and unused.
        states = torch.zeros(2, len(self.cache.key_states), *self.cache.shape_basic, dtype=torch.float16,
                             device=engine.device)
        self.cache.key_states, self.cache.value_states = list(states[0]), list(states[1])
        self.live: list[int] = []  # live rows (= their slots), ascending
        self.lengths: dict[int, int] = {}
        device, hidden = engine.device, engine.identity.hidden_size
        self.x = torch.zeros(rows, 1, hidden, dtype=torch.float16, device=device)
        self.pos = torch.zeros(rows, dtype=torch.int32, device=device)  # each live row's next position
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)
        self.cu_q = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.cu_k = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        self.deltas: dict[int, torch.Tensor] = {}  # layer -> [rows, 1, hidden], read by the graphs
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, dict[int, torch.Tensor]]] = {}
        self.filled: tuple | None = None  # the live rows and deltas the buffers hold

    @staticmethod
    def row_bytes(engine: ExLlamaV2Engine, length: int) -> int:
        """What one row of ``length`` positions holds on the device: its fp16 K and V at
        every layer (rounded as allocated), its logits (fp16 in the output of its decode
        graph: graphs of a bucket or a count of rows no longer live are dropped; fp32 in a
        step's sampling: the step's rows, their stack, the log-sum-exp and top-k passes,
        four copies at most) and its residual and delta rows. A pass's intermediates (at
        most ``CHUNK`` rows) live in exllamav2's scratch and the engine's graph pool, which
        the memory plan counts."""
        blocks, identity = engine._blocks, engine.identity
        per_token = sum(2 * a.num_key_value_heads * a.head_dim * 2 for a, _ in blocks)
        positions = round_up(length, BUCKET)
        logits = identity.vocab_size * (2 + 4 * 4)
        return per_token * positions + logits + identity.hidden_size * 2 * 4

    def slot_cache(self, slot: int):
        """A batch-1 ``ExLlamaV2Cache`` over the batch cache's slot ``slot`` (views, no copy)."""
        exl, _, _ = import_exllamav2()
        view = exl.ExLlamaV2Cache(self.engine.model, batch_size=1, max_seq_len=self.capacity, lazy=True)
        view.key_states = [k[slot:slot + 1] for k in self.cache.key_states]
        view.value_states = [v[slot:slot + 1] for v in self.cache.value_states]
        return view

    def prefill(self, prompts: list[list[int]], deltas: list[dict[int, torch.Tensor]],
                capture: frozenset[int]) -> list[ForwardResult]:
        """Each prompt into its slot through the engine's module path; every row live."""
        out = []
        for slot, (ids, row_deltas) in enumerate(zip(prompts, deltas)):
            out.append(self.engine._forward_modules(ids, row_deltas, capture, cache=self.slot_cache(slot)))
            self.lengths[slot] = len(ids)
        self.live = list(range(len(prompts)))
        return out

    def step(self, tokens: list[int], deltas: list[dict[int, torch.Tensor]], capture: frozenset[int]
             ) -> list[ForwardResult]:
        """One token for every live row (in ``live`` order), on the engine's stream."""
        engine, n = self.engine, len(self.live)
        caller = torch.cuda.current_stream()
        engine._stream.wait_stream(caller)  # the prefill's cache writes, the caller's deltas
        bucket = min(round_up(max(self.lengths[r] for r in self.live) + 1, BUCKET), self.capacity)
        layers = sorted({layer for d in deltas for layer in d})
        keys = [(bucket, start, min(CHUNK, n - start), tuple(layers), capture) for start in range(0, n, CHUNK)]
        shapes = {key[:3] for key in keys}
        for key in [key for key in self.graphs if key[:3] not in shapes]:
            del self.graphs[key]  # rows left or the bucket grew: never replayed again; its outputs freed
        embedded = engine._embedding.forward(torch.tensor([[t] for t in tokens]))  # [n, 1, hidden], CPU
        with torch.cuda.stream(engine._stream):
            self.x[:n].copy_(embedded.to(engine.device))
            self.pos[:n].copy_(torch.tensor([self.lengths[r] for r in self.live], dtype=torch.int32))
            self.slots[:n].copy_(torch.tensor(self.live))
            self.cu_k[:n + 1].copy_(torch.tensor([*self.live, self.cache.batch_size], dtype=torch.int32)
                                    * self.capacity)
            filled = (tuple(self.live), [residual.deltas_key(d) for d in deltas])
            if self.filled is None or self.filled[0] != filled[0] or not all(
                    residual.same_deltas(d, key) for d, key in zip(deltas, self.filled[1])):
                self.fill_deltas(layers, deltas)  # the rows' deltas changed: refill
            self.filled = filled
            results = []
            for key in keys:
                if key in self.graphs:
                    graph, logits, hidden = self.graphs[key]
                    graph.replay()
                else:
                    logits, hidden = self.decode(*key)
                rows = logits[:, -1].float()  # [n, vocab], out of the graph's static output
                results += [ForwardResult(logits=rows[i], hidden={l: h[i:i + 1].clone() for l, h in hidden.items()})
                            for i in range(key[2])]
        for key in keys:
            if engine.use_graphs and key not in self.graphs:
                graph = torch.cuda.CUDAGraph()  # after an eager run of the same pass: warmed up
                with torch.cuda.graph(graph, pool=engine._pool, stream=engine._stream):
                    self.graphs[key] = (graph, *self.decode(*key))
        for r in results:
            for t in (r.logits, *r.hidden.values()):
                t.record_stream(caller)
        caller.wait_stream(engine._stream)
        for r in self.live:
            self.lengths[r] += 1
        return results

    def fill_deltas(self, layers: list[int], deltas: list[dict[int, torch.Tensor]]) -> None:
        """Each live row's delta at each of ``layers`` into the static buffers (zeros for
        a row without one there)."""
        for layer in layers:
            if layer not in self.deltas:
                self.deltas[layer] = torch.empty_like(self.x)
            buffer = self.deltas[layer]
            buffer.zero_()
            for i, d in enumerate(deltas):
                if layer in d:
                    buffer[i, 0].copy_(d[layer])

    def decode(self, bucket: int, start: int, n: int, delta_layers: tuple[int, ...],
               capture: frozenset[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The direct pass over entries ``start .. start + n - 1`` of the static buffers
        (see the module): ``[n, 1, vocab]`` fp16 logits and layer -> ``[n, hidden]`` captures."""
        engine, end = self.engine, start + n
        ext, none, x = engine._ext, engine._none, self.x[start:end]
        pos, slots = self.pos[start:end], self.slots[start:end]
        used = pos + 1  # [n] int32: keys each row attends to
        constants = engine.model.get_device_context(engine._blocks[0][0].device_idx)
        hidden: dict[int, torch.Tensor] = {}
        for i, (attn, mlp) in enumerate(engine._blocks):
            heads, kv_heads, head_dim = attn.num_attention_heads, attn.num_key_value_heads, attn.head_dim
            q = torch.empty(n, 1, heads * head_dim, dtype=torch.float16, device=engine.device)
            k = torch.empty(n, 1, kv_heads * head_dim, dtype=torch.float16, device=engine.device)
            v = torch.empty_like(k)
            ext.q_attn_forward_1(attn.q_handle, x, n, 1, -1, pos, q, k, v,
                                 constants.sin[attn.rope_index], constants.cos[attn.rope_index], [], none)
            k_cache = self.cache.key_states[attn.layer_idx]  # [rows, capacity, kv_heads, dim]
            v_cache = self.cache.value_states[attn.layer_idx]
            k_cache.index_put_((slots, pos.long()), k.view(n, kv_heads, head_dim))
            v_cache.index_put_((slots, pos.long()), v.view(n, kv_heads, head_dim))
            flat = (-1, kv_heads, head_dim)
            out = torch.ops.aten._flash_attention_forward(
                q.view(n, heads, head_dim), k_cache.view(flat), v_cache.view(flat),
                self.cu_q[:n + 1], self.cu_k[start:end + 1], 1, bucket, 0.0, False, False,
                scale=attn.scaling, seqused_k=used)[0]  # [n, heads, dim]
            ext.q_attn_forward_2(attn.q_handle, x, out.view(n, 1, heads * head_dim), n, 1, [], none)
            ext.q_mlp_forward_(mlp.q_handle, x, [], none)
            if attn.archparams.clamp_hidden_states:
                x.clamp_(-65504, 65504)
            if i in delta_layers:
                x.add_(self.deltas[i][start:end])
            if i in capture:
                hidden[i] = x[:, 0].clone()  # [n, hidden]
        return engine._logits(x), hidden
