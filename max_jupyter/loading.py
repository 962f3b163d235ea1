"""One loader for both backends: which backend a source needs, and the engines for a
big and an optional small model, with progress."""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from max_jupyter.errors import BackendUnavailableError, BadArgumentError
from max_jupyter.models import quant_method
from max_jupyter.validation import (
    check_device,
    check_dtype,
    check_int8_device,
    check_max_seq_len,
    default_device,
    fail,
)

if TYPE_CHECKING:
    from max_jupyter.engines.base import Engine

Backend = Literal["auto", "transformers", "exllamav2", "exllamav3"]
BACKENDS = ("auto", "transformers", "exllamav2", "exllamav3")
GPU_INSTALL = "pip install 'max-jupyter[gpu]' (exllamav2==0.3.2) on a machine with a CUDA GPU"
EXL3_INSTALL = "pip install 'max-jupyter[exl3]' (exllamav3==1.6.5) on a machine with a CUDA GPU"
Source = str | os.PathLike | None


def is_quantized_folder(source: Source) -> bool:
    """Whether ``source`` is a folder of EXL2 or GPTQ weights (its config.json says so)."""
    return source is not None and quant_method(source) in ("exl2", "gptq")


def exllamav2_available() -> bool:
    """CUDA is present and exllamav2 is installed (not imported: that builds its extension)."""
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("exllamav2") is not None


def exllamav3_available() -> bool:
    """CUDA is present and exllamav3 is installed (not imported: that builds its extension)."""
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("exllamav3") is not None


def choose_backend(backend: str, big: Source) -> str:
    """The backend for ``big``: ``auto`` takes ExLlamaV3 for an EXL3 folder, ExLlamaV2 for an
    EXL2/GPTQ folder (refused with the install command where CUDA or the library is
    missing), else transformers. An explicit choice is checked."""
    if backend not in BACKENDS:
        raise BadArgumentError(f"backend={backend!r} is not a backend; use one of {list(BACKENDS)}.")
    if backend == "auto" and big is not None and quant_method(big) == "exl3":
        backend = "exllamav3"
    if backend == "exllamav3":
        if not exllamav3_available():
            raise BackendUnavailableError(
                f"the exllamav3 backend (for EXL3 folders) needs CUDA and exllamav3; install with "
                f"{EXL3_INSTALL}.")
        return backend
    if backend == "auto" and not is_quantized_folder(big):
        return "transformers"
    if backend == "auto":
        backend = "exllamav2"  # EXL2/GPTQ weights: transformers cannot run them here
    if backend == "exllamav2" and not exllamav2_available():
        raise BackendUnavailableError(
            f"the exllamav2 backend (for EXL2/GPTQ folders) needs CUDA and exllamav2; install "
            f"with {GPU_INSTALL}, or use backend='transformers' with HF-format weights.")
    return backend


def resolve_name(source: Source) -> Source:
    """A model name of ``pair.PINNED`` (``"qwen2.5-coder-1.5b"``...) as its fetched GGUF
    (``ModelSourceError`` naming ``make real-pair`` where not fetched); other sources as they are."""
    from max_jupyter.pair import PINNED, named_gguf

    return named_gguf(source) if isinstance(source, str) and source in PINNED else source


def check_sources(big: Source, small: Source, backend: str = "auto") -> None:
    """Check the backend and that every source holds a model, before anything is loaded,
    converted or freed (``small`` may be None or ``"same"``)."""
    from max_jupyter.models import check_source

    big, small = resolve_name(big), resolve_name(small)
    choose_backend(backend, big)
    check_source(big)
    if small is not None and small != "same":
        check_source(small)


def check_devices(device: object, devices: object, has_small: bool) -> tuple:
    """The big and the small model's devices: ``devices`` (a pair, big's first), else
    ``device`` for both (None: the backend's default). Both at once, a pair without a small
    model, or a device this machine lacks are refused."""
    if devices is None:
        return check_device(device), check_device(device)
    if device is not None:
        raise fail("devices", devices, f"and device={device!r} are both given",
                   "pass device= (both models) or devices=(big, small), not both")
    if isinstance(devices, (str, bytes)) or not isinstance(devices, (tuple, list)) or len(devices) != 2:
        raise fail("devices", devices, "is not a pair", 'pass (big device, small device), e.g. ("cuda:0", "cuda:1")')
    if not has_small:
        raise fail("devices", devices, "places a small model, but none is loaded",
                   "pass device= for the big model alone, or small=... too")
    return check_device(devices[0], "devices[0]"), check_device(devices[1], "devices[1]")


def check_dtypes(dtype: object, has_small: bool, placed: tuple = (None, None)) -> tuple:
    """The big and the small model's weight dtypes: ``dtype`` for both, or a pair (big's
    first; None: the device's default) where a small model is loaded; ``"int8"`` checked
    against each model's device in ``placed`` (``check_devices``; ``check_int8_device``)."""
    if not isinstance(dtype, (tuple, list)):
        dtypes = check_dtype(dtype), check_dtype(dtype)
    elif len(dtype) != 2:
        raise fail("dtype", dtype, "is not a pair",
                   "pass one dtype for both models or (big's, small's), e.g. (None, \"int8\")")
    elif not has_small:
        raise fail("dtype", dtype, "sets a small model's dtype, but none is loaded",
                   "pass one dtype for the big model alone, or small=... too")
    else:
        dtypes = check_dtype(dtype[0], "dtype[0]"), check_dtype(dtype[1], "dtype[1]")
    for weights, device in zip(dtypes[:1 + has_small], placed):
        check_int8_device(weights, device)
    return dtypes


def load_models(big: Source, small: Source, *, backend: str = "auto",
                max_vram_gb: float | None = None, cache_tokens: int | None = None,
                device: str | None = None, devices: tuple | None = None, dtype=None,
                progress: bool = True) -> tuple[Engine, Engine | None, object | None]:
    """Load the big engine and, unless ``small`` is None, the small one (``"same"``: the big
    source again, as a separate engine), on ``device`` or ``devices`` (``check_devices``), in
    ``dtype`` (``check_dtypes``). Returns ``(big, small, memory plan or None)``."""
    check_sources(big, small, backend)
    named_small = small
    big, small = resolve_name(big), resolve_name(small)
    has_small = small is not None
    if small == "same":
        small = big
    backend = choose_backend(backend, big)
    placed = check_devices(device, devices, has_small)
    if backend in ("exllamav2", "exllamav3") and devices is not None:
        raise fail("devices", devices, "places models on the transformers backend only",
                   f"leave it out: the {backend} backend loads both models on the current CUDA device")
    if backend in ("exllamav2", "exllamav3") and dtype is not None:
        raise fail("dtype", dtype, "applies to the transformers backend only",
                   f"leave it out: the {backend} backend runs the folder's own quantized weights")
    if backend == "exllamav2":
        return _load_exllamav2(big, small, max_vram_gb, cache_tokens)
    if backend == "exllamav3":
        return _load_exllamav3(big, small, max_vram_gb, cache_tokens)
    if max_vram_gb is not None:
        raise BadArgumentError(f"max_vram_gb={max_vram_gb!r} applies to the exllamav2 backend only; "
                               f"the transformers backend has no memory plan (leave it out).")
    from tqdm.auto import tqdm

    from max_jupyter.engines.transformers import TransformersEngine

    # Checked before the bar opens, so a mistake leaves no 0% bar above its error.
    dtypes, _ = check_dtypes(dtype, has_small, placed), check_max_seq_len(cache_tokens)
    from max_jupyter.pair import SMALL, SMALL_CPU_DTYPE

    if has_small and dtypes[1] is None and named_small == SMALL.name and default_device(placed[1]).type == "cpu":
        dtypes = (dtypes[0], SMALL_CPU_DTYPE)  # the pair's drafter: cheaper, the big model's tokens kept
    sources = [("big", big, placed[0], dtypes[0])]
    if has_small:
        sources.append(("small", small, placed[1], dtypes[1]))
    engines = []
    with tqdm(total=len(sources), desc="loading", unit="model", disable=not progress) as bar, \
            _transformers_bars_off():
        for name, source, on, weights in sources:
            bar.set_postfix_str(f"{name}: {source or 'embedded SmolLM2-135M-Instruct'}")
            engines.append(TransformersEngine.load(source, device=on, dtype=weights,
                                                   max_seq_len=cache_tokens))
            bar.update()
    return engines[0], (engines[1] if has_small else None), None


@contextlib.contextmanager
def _transformers_bars_off() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") off while we load: a load shows
    one bar, ours. Restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load_exllamav2(big: Source, small: Source, max_vram_gb: float | None,
                    cache_tokens: int | None) -> tuple[Engine, Engine | None, object]:
    from max_jupyter.engines.exllamav2 import load_engines

    if big is None:
        raise BadArgumentError("backend='exllamav2' needs a model folder (EXL2, GPTQ or fp16); "
                               "the embedded model runs on backend='transformers'.")
    folders = [("big", big)] + ([("small", small)] if small is not None else [])
    engines, plan = load_engines(folders, max_vram_gb, cache_tokens)
    return engines[0], (engines[1] if small is not None else None), plan


def _load_exllamav3(big: Source, small: Source, max_vram_gb: float | None,
                    cache_tokens: int | None) -> tuple[Engine, Engine | None, object]:
    from max_jupyter.engines.exllamav3 import load_engines

    if big is None:
        raise BadArgumentError("backend='exllamav3' needs an EXL3 model folder; the embedded model "
                               "runs on backend='transformers'.")
    folders = [("big", big)] + ([("small", small)] if small is not None else [])
    engines, plan = load_engines(folders, max_vram_gb, cache_tokens)
    return engines[0], (engines[1] if small is not None else None), plan
