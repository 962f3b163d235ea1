"""Weights built here, for tests and benchmarks without a model hub.

``write_gptq_rtn`` turns a model into a 4-bit GPTQ checkpoint (its dequantised weights
written back, so the model is the exact reference); ``build_tiny_model`` makes a tiny random
Llama with a tokenizer of its own.
"""
from __future__ import annotations

import os
from pathlib import Path

from max_jupyter.models import write_rope_theta

GPTQ_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_gptq_rtn(model, folder: str | os.PathLike, group_size: int = 128) -> Path:
    """Quantise ``model``'s decoder linears to 4-bit GPTQ (symmetric round-to-nearest) and
    save a GPTQ checkpoint (``qweight``/``qzeros``/``scales``/``g_idx``, format ``gptq``) to
    ``folder``; embeddings, norms, biases and the head stay fp16.

    Side effect: each quantised weight of ``model`` is replaced by its dequantised 4-bit value,
    so ``model`` becomes the exact fp16 reference of the checkpoint (for parity tests and
    benchmarks on weights built in place; no calibration, no hub). Returns ``folder``.
    """
    import json

    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    quantised: set[str] = set()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name in GPTQ_LINEARS:
                key = f"model.layers.{i}.{name}"
                linear = layer.get_submodule(name)
                q, scales, dequant = _rtn4(linear.weight.float(), group_size)  # [in, out] ...
                linear.weight.copy_(dequant.to(linear.weight.dtype))
                tensors[f"{key}.qweight"] = _pack4(q, dim=0).contiguous().cpu()  # [in/8, out]
                tensors[f"{key}.qzeros"] = _pack4(torch.full((scales.shape[0], q.shape[1]), 7,
                                                             dtype=torch.int64, device=q.device),
                                                  dim=1).contiguous().cpu()  # [groups, out/8]
                tensors[f"{key}.scales"] = scales.half().contiguous().cpu()  # [groups, out]
                tensors[f"{key}.g_idx"] = (torch.arange(q.shape[0], dtype=torch.int32)
                                           // group_size)  # [in]
                quantised.add(f"{key}.weight")
        for name, value in model.state_dict().items():
            if name not in quantised and not (name == "lm_head.weight" and model.config.tie_word_embeddings):
                tensors[name] = value.detach().half().contiguous().cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    write_rope_theta(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                  "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


def _rtn4(weight, group_size: int):
    """Symmetric 4-bit round-to-nearest of ``weight`` ``[out, in]`` per (input group, output).

    Returns ``q`` ``[in, out]`` int64 in 0..15 (zero point 8), ``scales`` ``[in/group, out]``
    and the dequantised weight ``[out, in]``.
    """
    w = weight.t()  # [in, out]
    n_in, n_out = w.shape
    if n_in % group_size or n_out % 8:
        raise ValueError(f"GPTQ needs in-features divisible by {group_size} and out-features by 8; "
                         f"got {n_in}x{n_out}.")
    groups = w.reshape(n_in // group_size, group_size, n_out)  # [groups, group, out]
    scales = (groups.abs().amax(dim=1) / 7).clamp(min=1e-6).half().float()  # [groups, out]
    q = (groups / scales[:, None]).round().clamp(-8, 7) + 8  # [groups, group, out]
    dequant = ((q - 8) * scales[:, None]).reshape(n_in, n_out).t()  # [out, in]
    return q.reshape(n_in, n_out).long(), scales, dequant


def _pack4(values, dim: int):
    """Pack 4-bit ``values`` (int64, 0..15) eight to an int32 along ``dim`` (low nibble first)."""
    import torch

    v = values.movedim(dim, 0)
    v = v.reshape(v.shape[0] // 8, 8, *v.shape[1:])  # [n/8, 8, ...]
    shifts = (torch.arange(8, device=v.device) * 4).reshape(1, 8, *([1] * (v.dim() - 2)))
    packed = (v << shifts).sum(dim=1)  # [n/8, ...] int64 in 0..2^32-1
    packed = packed - (packed >= 2**31).long() * 2**32  # two's complement, int32 range
    return packed.to(torch.int32).movedim(0, dim)


TINY_TEXT = [
    "The weather today is sunny with a light breeze from the west.",
    "Once upon a time there was a small cat who loved to read stories.",
    "Steering a language model means adding a direction to its residual stream.",
    "The quick brown fox jumps over the lazy dog, and then it rests in the shade.",
    "Numbers like 12, 345 and 6789 appear in text; so do symbols: (a + b) * c.",
    "A question? An answer! Some lines end here.\nOthers continue on the next line.",
]


def build_tiny_model(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Train a ~300-token byte-level BPE on ``TINY_TEXT`` and save it with a randomly
    initialised 2-layer Llama (hidden 64) as a HF folder; return ``folder``.

    A small model whose tokenizer differs from the embedded one, built here with no
    download (for the text-level mirror, its tests and benchmarks)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TINY_TEXT, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
