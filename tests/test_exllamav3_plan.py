"""The ExLlamaV3 backend's parts that run without a GPU: EXL3 folders are recognised and
routed to it (and refused with the install command where CUDA or exllamav3 is missing),
other folders are refused by it, and its memory plan reads the weights from the
safetensors headers. The engine itself is tested on the GPU (test_exllamav3_gpu.py)."""
from __future__ import annotations

import json

import pytest

from max_jupyter.engines.exllamav2.plan import GiB, VramBudgetError, plan_memory
from max_jupyter.engines.exllamav3 import measure_model, read_raw_config
from max_jupyter.engines.exllamav3.plan import cache_bytes_per_token, check_cache_bits
from max_jupyter.errors import BackendUnavailableError, BadArgumentError
from max_jupyter.loading import choose_backend, exllamav3_available
from max_jupyter.models import quant_method
from max_jupyter.testing import write_random_exl3

SHAPE = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_random_exl3(tmp_path_factory.mktemp("exl3"), SHAPE, vocab_size=1024)


def test_folder_is_exl3_and_auto_picks_exllamav3(folder):
    assert quant_method(folder) == "exl3"
    if exllamav3_available():
        assert choose_backend("auto", folder) == "exllamav3"
    else:
        with pytest.raises(BackendUnavailableError, match=r"exllamav3==1\.6\.5"):
            choose_backend("auto", folder)
    assert choose_backend("transformers", folder) == "transformers"  # forced


def test_other_folders_are_refused_by_the_backend(folder, tmp_path):
    raw = json.loads((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((folder / "model-000.safetensors").read_bytes())
    for method, arch, fragment in (("exl2", "Qwen2ForCausalLM", "holds exl2 weights, not EXL3"),
                                   ("exl3", "GemmaForCausalLM", "holds a GemmaForCausalLM model")):
        (tmp_path / "config.json").write_text(json.dumps(
            raw | {"architectures": [arch], "quantization_config": {"quant_method": method}}))
        with pytest.raises(BadArgumentError, match=fragment):
            read_raw_config(tmp_path)
    with pytest.raises(BadArgumentError, match="cache_bits"):
        check_cache_bits(1)


def test_plan_reads_weights_from_headers(folder):
    m = measure_model("big", folder, max_input_len=512)
    h, inter, kv, layers, vocab = 256, 512, 128, 2, 1024
    trellis = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) * 4 // 8 + h * vocab * 6 // 8
    scales = layers * 2 * (9 * h + 2 * kv + 3 * inter) + 2 * (h + vocab)  # suh + svh, fp16
    markers, biases, norms = 4 * (7 * layers + 1), layers * 2 * (h + 2 * kv), 2 * h * (2 * layers + 1)
    assert m.weights == trellis + scales + markers + biases + norms
    assert m.host_embedding == vocab * h * 2  # the embedding table stays on the CPU
    assert m.cache_per_token == layers * 2 * kv * 2
    assert cache_bytes_per_token(json.loads((folder / "config.json").read_text()), 4) \
        == layers * (2 * kv * 4 // 8 + 2 * (kv // 32) * 2)
    plan = plan_memory([m, measure_model("small", folder, 512)], max_vram_gb=2, cache_tokens=4096,
                       max_input_len=512)
    assert plan.total <= 2 * GiB and plan.cache_tokens == 4096
    with pytest.raises(VramBudgetError, match="big weights"):
        plan_memory([m], max_vram_gb=0.5, cache_tokens=4096, max_input_len=512)
