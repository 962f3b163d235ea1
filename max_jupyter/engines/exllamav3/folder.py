"""Reading an EXL3 model folder: the lazy import of exllamav3 itself, the format and
architecture checks, and the tensor sizes from the safetensors headers (nothing allocated)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from max_jupyter.errors import BackendUnavailableError, BadArgumentError
from max_jupyter.models import check_hf_folder, quant_method

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
"""exllamav3 runs ~50 architectures; the engine drives those whose modules are embedding,
``TransformerBlock``s, norm and head (checked again on the loaded model)."""
EMBEDDING_KEY = "model.embed_tokens"  # exllamav3 keeps this table on the CPU


def import_exllamav3():
    """The ``exllamav3`` module (importing it builds or loads its CUDA extension);
    ``BackendUnavailableError`` without CUDA or exllamav3."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError("The ExLlamaV3 backend needs a CUDA GPU; use TransformersEngine "
                                      "on the CPU.")
    try:
        import exllamav3
    except ImportError as e:
        raise BackendUnavailableError("The ExLlamaV3 backend needs exllamav3 1.6.5: "
                                      "pip install 'max-jupyter[exl3]' (or exllamav3==1.6.5)") from e
    return exllamav3


def read_raw_config(folder: str | os.PathLike) -> dict:
    """``folder``'s config.json as a dict, after checking the folder (``ModelSourceError``),
    that it holds EXL3 weights and an architecture this backend runs (``BadArgumentError``)."""
    folder = Path(folder)
    check_hf_folder(folder)
    raw = json.loads((folder / "config.json").read_text())
    method = quant_method(folder)
    if method != "exl3":
        raise BadArgumentError(f"folder={str(folder)!r} holds {method or 'unquantised'} weights, not "
                               f"EXL3; load it with backend='exllamav2' (EXL2, GPTQ) or "
                               f"'transformers' (fp16), or convert it with exllamav3's convert_model.")
    arch = (raw.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise BadArgumentError(f"folder={str(folder)!r} holds a {arch} model, which the ExLlamaV3 "
                               f"backend does not run; use a {' or '.join(SUPPORTED_ARCHITECTURES)} "
                               f"folder.")
    return raw


def tensor_bytes(folder: str | os.PathLike) -> dict[str, int]:
    """Tensor name -> bytes over ``folder``'s ``*.safetensors``, from their headers alone."""
    sizes: dict[str, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                sizes[name] = end - start
    return sizes
