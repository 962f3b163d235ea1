"""oneDNN-packed linear layers (engines/cpu_linear.py): the same products as ``nn.Linear``
to float32 rounding, swapped in by ``TransformersEngine.load`` for fp32 CPU models only, and
a packed engine's logits and greedy tokens those of the same model left dense."""
from __future__ import annotations

import gc

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from max_jupyter.engines import TransformersEngine
from max_jupyter.engines.cpu_linear import PackedLinear, can_pack, pack_linears
from max_jupyter.testing import build_tiny_model
from max_jupyter.tokenizer import Tokenizer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_a_packed_linear_computes_the_linears_product(rows, bias):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 80, bias=bias)
    x = torch.randn(2, rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_load_packs_fp32_cpu_models_only(folder):
    packed = TransformersEngine.load(folder, device="cpu")
    kinds = {type(m) for m in packed.model.modules()}
    assert PackedLinear in kinds and torch.nn.Linear not in kinds
    half = TransformersEngine.load(folder, device="cpu", dtype=torch.bfloat16)
    assert not can_pack(half.model)
    assert PackedLinear not in {type(m) for m in half.model.modules()}


def test_a_packed_engine_generates_as_the_dense_one(folder):
    dense_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    dense = TransformersEngine(dense_model, Tokenizer.from_folder(folder))
    packed = TransformersEngine.load(folder, device="cpu")
    assert pack_linears(AutoModelForCausalLM.from_pretrained(str(folder))) == 2 * 7 + 1  # q k v o gate up down, head
    ids = [5, 17, 40, 3, 99, 12, 7]
    a, b = dense.verify(ids).all_logits, packed.verify(ids).all_logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for engine in (dense, packed):
        engine.reset()
    tokens = {}
    for name, engine in (("dense", dense), ("packed", packed)):
        token, out = ids[-1], engine.prefill(ids[:-1])
        row = []
        for _ in range(16):
            out = engine.step(token)
            token = int(out.logits.argmax())
            row.append(token)
        tokens[name] = row
    assert tokens["packed"] == tokens["dense"]


def test_a_packed_engine_keeps_nothing_of_the_weights_files_mapping(folder, tmp_path):
    """Every tensor the packed model uses (the biases the packed layers keep included) lives
    in memory of its own: the safetensors file is no longer mapped once loading is done.
    (A bias left on the mapping kept all of the real pair's files resident: 19.6 GB RSS,
    10.2 GB without.)"""
    config = AutoConfig.from_pretrained(folder)
    config.attention_bias = True  # q, k, v and o with biases, as Qwen2's q, k and v
    biased = tmp_path / "biased"
    AutoModelForCausalLM.from_config(config).save_pretrained(biased)
    AutoTokenizer.from_pretrained(folder).save_pretrained(biased)
    engine = TransformersEngine.load(biased, device="cpu")
    assert any(m.bias is not None for m in engine.model.modules() if isinstance(m, PackedLinear))
    gc.collect()
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if str(biased) in line]
    assert not mapped, mapped
