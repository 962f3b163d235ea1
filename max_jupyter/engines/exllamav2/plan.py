"""VRAM planning for the ExLlamaV2 backend: the bytes each model needs (from its config
and safetensors headers, nothing allocated), a layout of one or two models in a budget,
and the peak measured at run time to hold against it."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from max_jupyter.engines.exllamav2.folder import drop_zero_gptq_biases, import_exllamav2, read_config, read_raw_config
from max_jupyter.errors import BadArgumentError, MaxJupyterError
from max_jupyter.validation import check_int, check_real

GiB = 1024 ** 3
BUCKET = 256  # decode attention reads the cache in buckets of this many positions
CONTEXT_OVERHEAD = 820 * 1024 ** 2  # CUDA context, kernels, cuBLAS (0.80 GiB measured, H200)
GRAPH_POOL = 64 * 1024 ** 2  # per engine: decode graphs' intermediates and outputs


class VramBudgetError(MaxJupyterError, MemoryError):
    """Two models, their caches and buffers do not fit the VRAM budget (raised before allocating)."""


@dataclass(frozen=True)
class ModelMemory:
    """Bytes one model needs on the GPU, from its config and safetensors headers (no allocation)."""

    name: str
    folder: str
    weights: int  # GPU weights (quantised linears, norms, head)
    scratch: int  # exllamav2's fixed per-device scratch (sized by max_input_len)
    cache_per_token: int  # fp16 K and V of every layer, one position
    sincos_per_token: int  # rope sin/cos tables, one position
    prefill_fixed: int  # transient activations of one prefill chunk
    prefill_per_token: int  # transient bytes per cached position during prefill (GQA K/V expansion, mask)
    host_embedding: int  # token-embedding table kept on the CPU
    max_positions: int


@dataclass(frozen=True)
class MemoryPlan:
    """A VRAM layout: parts in bytes, the cache capacity in tokens, and the budget."""

    models: tuple[ModelMemory, ...]
    cache_tokens: int
    max_input_len: int
    budget: int

    def cache_bytes(self, m: ModelMemory) -> int:
        return m.cache_per_token * self.cache_tokens

    @property
    def working(self) -> int:
        """Scratch + rope tables + graph pools of every model, plus the largest prefill peak."""
        peak = max(m.prefill_fixed + m.prefill_per_token * self.cache_tokens for m in self.models)
        return peak + sum(m.scratch + m.sincos_per_token * self.cache_tokens + GRAPH_POOL
                          for m in self.models)

    @property
    def total(self) -> int:
        return (sum(m.weights + self.cache_bytes(m) for m in self.models) + self.working
                + CONTEXT_OVERHEAD)

    def parts(self) -> list[tuple[str, int, str]]:
        """(part, bytes, note) rows, in the order of the report."""
        rows = [(f"{m.name} weights", m.weights, Path(m.folder).name) for m in self.models]
        rows += [(f"{m.name} KV cache", self.cache_bytes(m),
                  f"{self.cache_tokens} tokens x {m.cache_per_token / 1024:.0f} KiB")
                 for m in self.models]
        rows.append(("working buffers", self.working,
                     f"scratch + rope tables + decode graphs + prefill chunk of "
                     f"{self.max_input_len} at full cache"))
        rows.append(("overhead", CONTEXT_OVERHEAD, "CUDA context, kernels, cuBLAS (estimate)"))
        return rows

    def table(self, measured: MeasuredPeak | None = None) -> str:
        """The layout as a markdown table (GiB); ``measured`` adds the measured peak."""
        lines = ["| part | GiB | note |", "|---|---:|---|"]
        lines += [f"| {name} | {size / GiB:.2f} | {note} |" for name, size, note in self.parts()]
        lines.append(f"| **total planned** | **{self.total / GiB:.2f}** | budget {self.budget / GiB:.2f} |")
        if measured is not None:
            lines.append(f"| measured peak | {measured.total / GiB:.2f} | torch peak reserved "
                         f"{measured.torch / GiB:.2f} + outside torch {measured.outside_torch / GiB:.2f}"
                         f" (CUDA context, kernels; mem_get_info) |")
        host = sum(m.host_embedding for m in self.models)
        lines.append(f"| (host RAM) embeddings | {host / GiB:.2f} | on the CPU, not in VRAM |")
        return "\n".join(lines)

    def describe_overflow(self) -> str:
        parts = " + ".join(f"{name} {size / GiB:.2f}" for name, size, _ in self.parts())
        return (f"needs {self.total / GiB:.2f} GiB > budget {self.budget / GiB:.2f} GiB: {parts} "
                f"(GiB). Lower cache_tokens or max_input_len, use a lower-bit quantisation, "
                f"or raise max_vram_gb.")


@dataclass(frozen=True)
class MeasuredPeak:
    """Device memory measured at run time, in bytes, to hold against a ``MemoryPlan``."""

    torch: int  # torch's peak reserved since the last reset_peak_memory_stats (less held)
    outside_torch: int  # what the device holds beyond torch's reserve: context, kernels

    @property
    def total(self) -> int:
        return self.torch + self.outside_torch


def measured_peak(held: int = 0) -> MeasuredPeak:
    """Peak memory of this process on GPU 0 since ``torch.cuda.reset_peak_memory_stats()``:
    torch's peak reserved less ``held`` (what torch held before the measured part), plus
    the device memory in use beyond torch's current reserve (``mem_get_info``: the CUDA
    context, loaded kernels, non-torch allocations), read now."""
    free, total = torch.cuda.mem_get_info()
    outside = total - free - torch.cuda.memory_reserved()
    return MeasuredPeak(torch.cuda.max_memory_reserved() - held, outside)



def measure_model(name: str, folder: str | os.PathLike, max_input_len: int = 2048):
    """(``ModelMemory``, unloaded ``ExLlamaV2``) for ``folder``; reads headers, allocates nothing."""
    exl, _, _ = import_exllamav2()
    max_positions = int(read_raw_config(folder).get("max_position_embeddings", 4096))
    config = read_config(folder, max_positions, max_input_len)
    model = exl.ExLlamaV2(config)
    drop_zero_gptq_biases(model)
    gpu_modules = model.modules[1:]  # the embedding stays on the CPU
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    hidden, inter, c = config.hidden_size, config.intermediate_size, max_input_len
    memory = ModelMemory(
        name=name, folder=str(folder),
        weights=sum(m.weight_footprint() for m in gpu_modules),
        scratch=max(m.scratch_space_fixed() for m in gpu_modules),
        cache_per_token=config.num_hidden_layers * 2 * kv_heads * head_dim * 2,
        sincos_per_token=head_dim * 2 * 2,
        prefill_fixed=c * 2 * (2 * hidden + (heads + 2 * kv_heads) * head_dim + 2 * heads * head_dim
                               + 3 * inter),
        prefill_per_token=2 * heads * head_dim * 2 + c,
        host_embedding=model.modules[0].weight_footprint(),
        max_positions=max_positions)
    return memory, model


def check_plan_args(max_vram_gb, cache_tokens, max_input_len) -> tuple[float | None, int | None, int]:
    """The planning arguments checked (``BadArgumentError``), before anything is read."""
    if max_vram_gb is not None:
        max_vram_gb = check_real("max_vram_gb", max_vram_gb, low=0, low_open=True,
                                 fix="pass the GiB of VRAM to use (e.g. 16), or None for the whole card")
    if cache_tokens is not None:
        cache_tokens = check_int("cache_tokens", cache_tokens, low=1,
                                 fix="pass positions to cache (e.g. 4096), or None for the most that fits")
    max_input_len = check_int("max_input_len", max_input_len, low=1,
                              fix="pass the longest prefill chunk in tokens (e.g. 2048)")
    return max_vram_gb, cache_tokens, max_input_len


def plan_memory(models: Sequence[ModelMemory], max_vram_gb: float | None = None,
                cache_tokens: int | None = None, max_input_len: int = 2048) -> MemoryPlan:
    """Lay out ``models`` (one or two) in ``max_vram_gb`` (default: the card's memory).

    Every model gets a cache of the same capacity (the small model mirrors the big one's
    context): ``cache_tokens`` if given, else the most that fits, rounded down to 256 and
    capped by each model's ``max_position_embeddings``. Raises ``BadArgumentError`` for
    arguments out of range, ``VramBudgetError`` naming every part and its size if the
    layout does not fit.
    """
    max_vram_gb, cache_tokens, max_input_len = check_plan_args(max_vram_gb, cache_tokens, max_input_len)
    budget = int((max_vram_gb or torch.cuda.get_device_properties(0).total_memory / GiB) * GiB)
    limit = min(m.max_positions for m in models)
    if cache_tokens is None:
        fixed = MemoryPlan(tuple(models), 0, max_input_len, budget).total
        per_token = (sum(m.cache_per_token + m.sincos_per_token for m in models)
                     + max(m.prefill_per_token for m in models))
        cache_tokens = min(limit, max(0, budget - fixed) // per_token) // BUCKET * BUCKET
        if cache_tokens < BUCKET:
            raise VramBudgetError("no room for a KV cache: "
                                  + MemoryPlan(tuple(models), BUCKET, max_input_len, budget)
                                  .describe_overflow())
    elif cache_tokens > limit:
        raise BadArgumentError(f"cache_tokens={cache_tokens} exceeds the models' "
                               f"max_position_embeddings ({limit}); pass cache_tokens <= {limit}, "
                               f"or None for the most that fits.")
    plan = MemoryPlan(tuple(models), min(round_up(cache_tokens, BUCKET), limit), max_input_len,
                      budget)
    if plan.total > budget:
        raise VramBudgetError(plan.describe_overflow())
    return plan


def round_up(n: int, k: int) -> int:
    """``n`` rounded up to a multiple of ``k``."""
    return -(-n // k) * k


def cap_allocator(plan: MemoryPlan) -> None:
    """Refuse a load that does not fit the GPU's free memory now (``VramBudgetError``), then
    cap torch's allocator at what this process already holds plus the plan's share. Side
    effect: the cap stays until ``release`` (or ``Session.close``) lifts it."""
    free, total = torch.cuda.mem_get_info()
    if plan.total - CONTEXT_OVERHEAD > free:
        raise VramBudgetError(f"only {free / GiB:.2f} GiB free on the GPU now; the load "
                              + plan.describe_overflow().replace("> budget", "vs budget"))
    held = torch.cuda.memory_reserved()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (held + plan.budget - CONTEXT_OVERHEAD) / total))


def release(models: Sequence) -> None:
    """Unload ``models`` (exllamav2 or exllamav3 ones), lift the allocator cap and give the
    cached blocks back: what a failed load leaves behind."""
    for model in models:
        model.unload()
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()
