"""VRAM planning for the ExLlamaV3 backend: the bytes an EXL3 model needs, from its config
and safetensors headers (nothing allocated, exllamav3 not imported). The layout of one or
two models in a budget is the ExLlamaV2 backend's (``plan_memory``): one plan, two backends."""
from __future__ import annotations

import os

from max_jupyter.engines.exllamav2.plan import GiB, ModelMemory
from max_jupyter.engines.exllamav3.folder import EMBEDDING_KEY, read_raw_config, tensor_bytes
from max_jupyter.validation import check_int

CACHE_BITS = (None, 2, 3, 4, 5, 6, 7, 8)
"""KV cache formats: None = fp16, else exllamav3's quantised cache of that many bits for
K and V (per 32 values one fp16 scale)."""
MODULE_STATICS = 80 * 1024 ** 2
"""Per model: exllamav3's per-module decode graphs and their static buffers, GEMM workspace
(an estimate; the GPU test holds the measured peak to the plan). 48 MiB held on the first
H100 run and not on the next two: two 4-layer models with 1500-token prefills peaked at
0.36-0.38 GiB in torch where 0.33 was planned."""
QUANT_STAGING_TOKENS = 8 * 256
"""Positions a quantised cache's prefill dequantises into an fp16 staging buffer
(exllamav3's ``_qc_staging_pages`` pages of 256)."""


def check_cache_bits(cache_bits: int | None) -> int | None:
    """``cache_bits`` checked (``BadArgumentError``): None (fp16) or 2..8."""
    if cache_bits is None:
        return None
    return check_int("cache_bits", cache_bits, low=2, high=8,
                     fix="pass None for an fp16 KV cache or 2..8 bits for a quantised one")


def cache_bytes_per_token(raw: dict, cache_bits: int | None) -> int:
    """K and V of every layer for one position (fp16, or quantised with its scales)."""
    heads = raw["num_attention_heads"]
    token_dim = raw.get("num_key_value_heads", heads) * (raw.get("head_dim")
                                                         or raw["hidden_size"] // heads)
    per_layer = (2 * token_dim * 2 if cache_bits is None
                 else 2 * token_dim * cache_bits // 8 + 2 * (token_dim // 32) * 2)
    return raw["num_hidden_layers"] * per_layer


def measure_model(name: str, folder: str | os.PathLike, max_input_len: int = 2048,
                  cache_bits: int | None = None) -> ModelMemory:
    """``ModelMemory`` of the EXL3 folder: weights on the GPU (everything but the token
    embeddings, which stay on the CPU; a tied head without its own tensor is the fp16
    table again, on the GPU), the cache per token and the transients of one prefill chunk
    of ``max_input_len`` tokens (fp32 residual and its pending sub-layer output, fp16
    attention inputs and outputs, fp32 MLP intermediates, the last row's logits)."""
    raw = read_raw_config(folder)
    sizes = tensor_bytes(folder)
    embedding = sum(b for k, b in sizes.items() if k.startswith(EMBEDDING_KEY + "."))
    weights = sum(sizes.values()) - embedding
    if not any(k.startswith("lm_head.") for k in sizes):
        weights += embedding  # tied head: exllamav3 loads the fp16 table onto the GPU
    hidden, inter, c = raw["hidden_size"], raw["intermediate_size"], max_input_len
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or hidden // heads
    kv = raw.get("num_key_value_heads", heads) * head_dim
    chunk = c * (3 * 4 * hidden + 2 * hidden + 2 * (heads * head_dim + 2 * kv) + 2 * heads * head_dim
                 + 3 * 4 * inter)
    staging = 0 if cache_bits is None else QUANT_STAGING_TOKENS * kv * 2 * 2 * 2  # K and V, fp16
    return ModelMemory(
        name=name, folder=str(folder), weights=weights, scratch=MODULE_STATICS + staging,
        cache_per_token=cache_bytes_per_token(raw, cache_bits), sincos_per_token=0,
        prefill_fixed=chunk + 2 * raw["vocab_size"] * 4, prefill_per_token=0,
        host_embedding=embedding, max_positions=int(raw.get("max_position_embeddings", 4096)))


__all__ = ["CACHE_BITS", "GiB", "cache_bytes_per_token", "check_cache_bits", "measure_model"]
