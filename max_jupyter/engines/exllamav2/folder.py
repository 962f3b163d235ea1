"""Reading a model folder into exllamav2: the lazy import of exllamav2 itself, the config
with this backend's settings and fixes, and the GPTQ-bias workaround (nothing allocated)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from max_jupyter.errors import BackendUnavailableError, BadArgumentError
from max_jupyter.models import check_hf_folder

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def import_exllamav2():
    """``(exllamav2, exllamav2.attn, exllamav2.ext)``: imports exllamav2 (which builds or
    loads its CUDA extension); ``BackendUnavailableError`` without CUDA or exllamav2."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError("The ExLlamaV2 backend needs a CUDA GPU; use TransformersEngine "
                                      "on the CPU.")
    try:
        import exllamav2
        from exllamav2 import attn, ext
    except ImportError as e:
        raise BackendUnavailableError("The ExLlamaV2 backend needs exllamav2 0.3.2: "
                                      "pip install 'max-jupyter[gpu]' (or exllamav2==0.3.2)") from e
    return exllamav2, attn, ext


def read_raw_config(folder: str | os.PathLike) -> dict:
    """``folder``'s config.json as a dict, after checking the folder (``ModelSourceError``)
    and that its architecture and rope settings are ones this backend runs (``BadArgumentError``)."""
    folder = Path(folder)
    check_hf_folder(folder)
    raw = json.loads((folder / "config.json").read_text())
    arch = (raw.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise BadArgumentError(f"folder={str(folder)!r} holds a {arch} model, which the ExLlamaV2 "
                               f"backend does not run; use a {' or '.join(SUPPORTED_ARCHITECTURES)} "
                               f"folder, or backend='transformers' for an fp16 one.")
    rope = raw.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in raw:
        raise BadArgumentError(f"folder={str(folder)!r}: config.json's rope_parameters has rope_type "
                               f"{rope['rope_type']!r}, which exllamav2 reads only from a "
                               f"'rope_scaling' entry; copy rope_parameters into 'rope_scaling' there.")
    return raw


def read_config(folder: str | os.PathLike, max_seq_len: int, max_input_len: int = 2048):
    """An ``ExLlamaV2Config`` for ``folder`` with this backend's settings and fixes.

    Checks the folder (``read_raw_config``), reads ``rope_theta`` from either the legacy
    key or transformers 5's ``rope_parameters``, and turns off exllamav2's per-module CUDA
    graphs (the engine graphs whole decode steps itself).
    """
    exl, _, _ = import_exllamav2()
    raw = read_raw_config(folder)
    rope = raw.get("rope_parameters") or {}
    config = exl.ExLlamaV2Config(str(folder))
    theta = raw.get("rope_theta", rope.get("rope_theta"))
    if theta is not None:
        config.rotary_embedding_base = float(theta)
    config.max_seq_len = max_seq_len
    config.max_input_len = max_input_len
    config.max_attention_size = max_input_len ** 2
    config.no_graphs = True
    config.arch_compat_overrides(quiet=True)
    return config


def drop_zero_gptq_biases(model) -> None:
    """exllamav2 discards an all-zero GPTQ bias, then fails asserting the layer has one
    (e.g. Qwen2 q/k/v biases that are zero): mark such layers bias-free before loading."""
    from exllamav2.linear import ExLlamaV2Linear

    tensors = model.config.tensor_file_map
    for module in model.modules_dict.values():
        if (isinstance(module, ExLlamaV2Linear) and module.has_bias
                and f"{module.key}.qweight" in tensors and f"{module.key}.bias" in tensors):
            if not module.load_multi(module.key, ["bias"], cpu=True)["bias"].any():
                module.has_bias = False
