"""Steering vectors to and from other tools' files, chosen by the file's suffix.

- ``.gguf``: llama.cpp control vectors (also what repeng's ``export_gguf`` / ``import_gguf``
  use), read and written with the ``gguf`` package: ``general.architecture =
  "controlvector"``, ``controlvector.model_hint`` (a model type such as ``"llama"``),
  ``controlvector.layer_count`` (uint32: how many directions, as repeng writes it), and one
  F32 tensor ``direction.N`` of length n_embd per layer, added at the output of block N —
  the same index as ours. llama.cpp refuses ``direction.0``, so a vector with layer 0 cannot
  be exported to GGUF.
- ``.safetensors``: this package's format (``SteeringVector.save``: tensors
  ``direction.N`` plus the model identity, checked on import), or any file of per-layer
  tensors named ``N`` or ``direction.N``.
- ``.pt``: a ``torch.save``d dict ``{layer: tensor}`` (keys ints, ``"N"`` or
  ``"direction.N"``), read with ``weights_only=True``.
- ``.npy``: a float array ``[num_layers, hidden]``, row i = layer i, all-zero rows meaning
  "no direction"; pickled objects are refused (loading them can run code).

A control-vector file carries no model fingerprint, so importing needs the target model:
each layer must exist in it and each direction must have its width (``ModelMismatchError``
otherwise); a file that is not a control vector at all raises ``CorruptFileError``.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.errors import CorruptFileError, ModelMismatchError
from max_jupyter.steering.vector import SteeringVector
from max_jupyter.validation import fail

SUFFIXES = (".gguf", ".safetensors", ".pt", ".npy")
ARCH = "controlvector"


def import_vector(path: str | os.PathLike, model: ModelIdentity, label: str | None = None
                  ) -> SteeringVector:
    """Read the control vector at ``path`` (format by suffix, see the module docstring) as a
    ``SteeringVector`` for ``model``, labelled ``label`` (default: the file's stem)."""
    path = _existing(path)
    if not isinstance(model, ModelIdentity):
        raise fail("model", model, "is not a ModelIdentity", "pass engine.identity")
    label = path.stem if label is None else label
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path, model, label)
    readers = {".gguf": _read_gguf, ".pt": _read_pt, ".npy": _read_npy}
    return _vector(readers[suffix](path, model), model, label, path)


def export_vector(vector: SteeringVector, path: str | os.PathLike,
                  model_hint: str | None = None) -> Path:
    """Write ``vector`` to ``path`` (format by suffix) atomically; return the path.

    ``model_hint`` (GGUF only): the model type llama.cpp and repeng record, by default
    derived from the architecture (``Qwen2ForCausalLM`` -> ``"qwen2"``).
    """
    if not isinstance(vector, SteeringVector):
        raise fail("vector", vector, f"is a {type(vector).__name__}, not a SteeringVector",
                   "pass a trained or imported SteeringVector")
    target = Path(path).expanduser()
    suffix = _suffix(target)
    if not target.parent.is_dir():
        raise fail("path", str(path), f"is in a folder that does not exist ({target.parent})",
                   "create the folder first")
    if suffix == ".safetensors":
        vector.save(target)
        return target
    if suffix == ".gguf" and 0 in vector.directions:
        raise fail("vector", vector.label, "has a direction at layer 0, which llama.cpp refuses "
                   "(it cannot steer the output of block 0)",
                   "export vector.select([l for l in vector.layers if l > 0])")
    writers = {".gguf": lambda tmp: _write_gguf(vector, tmp, model_hint or hint_for(vector.model)),
               ".pt": lambda tmp: torch.save(dict(vector.directions), tmp),
               ".npy": lambda tmp: np.save(tmp, _dense(vector), allow_pickle=False)}
    _atomic(target, writers[suffix])
    return target


def hint_for(model: ModelIdentity) -> str:
    """llama.cpp / repeng's ``model_hint`` for ``model``: its model type, from the
    architecture name (``LlamaForCausalLM`` -> ``"llama"``)."""
    arch = model.architecture
    for tail in ("ForCausalLM", "LMHeadModel", "Model"):
        if arch.endswith(tail) and len(arch) > len(tail):
            return arch[: -len(tail)].lower()
    return arch.lower()


# -- GGUF ------------------------------------------------------------------------------------

def _read_gguf(path: Path, model: ModelIdentity) -> dict[int, np.ndarray]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a bad magic, a truncated header, ...: the reader's own errors
        raise CorruptFileError(f"{path} is not a GGUF file ({e}).") from e
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise CorruptFileError(f"{path} is a GGUF file but not a control vector "
                               f"(general.architecture={arch!r}, not {ARCH!r}).")
    hint = _field(reader, f"{ARCH}.model_hint")
    if hint is not None and hint != hint_for(model):
        warnings.warn(f"{path}: control vector made for model type {hint!r}, loading it for "
                      f"{model.describe()} (width and layers match).", stacklevel=3)
    count = _field(reader, f"{ARCH}.layer_count")
    if count is not None and not 0 < int(count) <= model.num_layers:
        raise ModelMismatchError(f"{path} declares {count} layers, but {model.describe()} has "
                                 f"{model.num_layers}; import it for the model it was made for.")
    layers: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        layer = _layer_key(tensor.name, path)
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise CorruptFileError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name} of "
                                   f"shape {list(tensor.shape)}; control vectors hold 1-D F32.")
        if layer in layers:
            raise CorruptFileError(f"{path}: tensor {tensor.name} appears twice.")
        layers[layer] = np.array(tensor.data, dtype=np.float32)
    return layers


def _field(reader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _write_gguf(vector: SteeringVector, path: str, hint: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_string(f"{ARCH}.model_hint", hint)
    writer.add_uint32(f"{ARCH}.layer_count", len(vector.directions))
    for layer, d in vector.directions.items():
        writer.add_tensor(f"direction.{layer}", d.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# -- plain per-layer files -------------------------------------------------------------------

def _read_pt(path: Path, model: ModelIdentity) -> Mapping[int, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors of every kind
        raise CorruptFileError(f"{path} is not a plain torch file of tensors ({e}).") from e
    if not isinstance(data, Mapping):
        raise CorruptFileError(f"{path} holds a {type(data).__name__}, not a dict "
                               f"{{layer: tensor}}; save dict(vector.directions).")
    return {_layer_key(k, path): v for k, v in data.items()}


def _read_npy(path: Path, model: ModelIdentity) -> dict[int, np.ndarray]:
    try:
        table = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise CorruptFileError(
            f"{path} is not a plain .npy array ({e}). A pickled dict is refused because loading "
            f"it runs code; if you trust it, load it yourself with np.load(path, "
            f"allow_pickle=True).item() and build SteeringVector(dict, model).") from e
    if table.ndim != 2 or table.dtype.kind != "f":
        raise CorruptFileError(f"{path} holds a {table.dtype} array of shape {list(table.shape)}; "
                               f"expected floats of shape [num_layers, hidden].")
    if table.shape[0] != model.num_layers:
        raise ModelMismatchError(f"{path} has {table.shape[0]} layer rows, but "
                                 f"{model.describe()} has {model.num_layers} layers.")
    return {i: row for i, row in enumerate(table) if row.any()}


def _read_safetensors(path: Path, model: ModelIdentity, label: str) -> SteeringVector:
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), "np") as f:
            ours = "model" in (f.metadata() or {})
        if ours:
            vector = SteeringVector.load(path)
            vector.check_model(model)
            return SteeringVector(vector.directions, model, label)
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise CorruptFileError(f"{path} is not a safetensors file ({e}).") from e
    return _vector({_layer_key(k, path): v for k, v in tensors.items()}, model, label, path)


def _dense(vector: SteeringVector) -> np.ndarray:
    """``[num_layers, hidden]`` float32, zeros where the vector has no direction."""
    table = np.zeros((vector.model.num_layers, vector.model.hidden_size), np.float32)
    for layer, d in vector.directions.items():
        table[layer] = d.numpy()
    return table


# -- shared ----------------------------------------------------------------------------------

def _vector(layers: Mapping[int, Any], model: ModelIdentity, label: str, path: Path
            ) -> SteeringVector:
    """Check ``layers`` against ``model`` (layers exist, widths match, finite) and build."""
    if not layers:
        raise CorruptFileError(f"{path} holds no direction tensors; it is not a control vector.")
    bad = sorted(l for l in layers if not 0 <= l < model.num_layers)
    if bad:
        raise ModelMismatchError(f"{path} has directions for layer(s) {bad}, but "
                                 f"{model.describe()} has layers 0..{model.num_layers - 1}; "
                                 f"import it for the model it was made for.")
    directions = {}
    for layer, d in layers.items():
        d = d if isinstance(d, torch.Tensor) else torch.from_numpy(np.array(d))
        if d.shape != (model.hidden_size,):
            raise ModelMismatchError(f"{path}: layer {layer} has shape {list(d.shape)}, but "
                                     f"{model.describe()} needs [{model.hidden_size}]; import it "
                                     f"for the model it was made for.")
        if not d.is_floating_point() or not torch.isfinite(d).all():
            raise CorruptFileError(f"{path}: layer {layer} is not finite floating-point data.")
        directions[layer] = d.to(torch.float32)
    return SteeringVector(directions, model, label)


def _layer_key(key: Any, path: Path) -> int:
    """A layer index from ``N``, ``"N"`` or ``"direction.N"``."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    text = str(key).removeprefix("direction.")
    if not text.isdigit():
        raise CorruptFileError(f"{path}: entry {key!r} is not a layer direction (expected "
                               f"'direction.N'); it is not a control vector.")
    return int(text)


def _existing(path: str | os.PathLike) -> Path:
    target = Path(path).expanduser()
    _suffix(target)
    if not target.is_file():
        raise fail("path", str(path), "is not an existing file", "check the path")
    return target


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise fail("path", str(path), f"has suffix {suffix!r}, which is not a known vector format",
                   f"use one of {', '.join(SUFFIXES)}")
    return suffix


def _atomic(target: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then rename it over
    ``target``; on failure the temporary file is removed and ``target`` is untouched."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
