"""CPU linear layers (engines/cpu_linear.py). oneDNN-packed: the same products as
``nn.Linear`` to float32 rounding, swapped in by ``TransformersEngine.load`` for fp32 CPU
models only, and a packed engine's logits and greedy tokens those of the same model left
dense. Int8 (``dtype="int8"``): products within int8 rounding, weights stored as int8, a
row's precision its own, and the embedded model's next-token choices mostly fp32's."""
from __future__ import annotations

import gc

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from max_jupyter.engines import TransformersEngine
from max_jupyter.engines.cpu_linear import Int8Linear, PackedLinear, can_pack, pack_linears
from max_jupyter.testing import build_tiny_model
from max_jupyter.tokenizer import Tokenizer


@pytest.mark.parametrize("kind", [PackedLinear, Int8Linear], ids=["packed", "int8"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_a_cpu_linear_computes_the_linears_product(kind, rows, bias):
    """Packed: to float32 rounding. Int8: to int8 rounding (neither exact nor off)."""
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 80, bias=bias)
    x = torch.randn(2, rows, 96)
    with torch.inference_mode():
        got, want = kind(linear)(x), linear(x)
    if kind is PackedLinear:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    assert got.shape == want.shape and got.dtype == torch.float32
    error = float((got - want).abs().max() / want.abs().max())
    assert 1e-5 < error < 0.03, error


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


def test_load_int8_stores_every_linear_weight_as_int8(folder):
    engine = TransformersEngine.load(folder, device="cpu", dtype="int8")
    kinds = [type(m) for m in engine.model.modules()]
    assert kinds.count(Int8Linear) == 2 * 7 + 1 and torch.nn.Linear not in kinds and PackedLinear not in kinds
    layer = next(m for m in engine.model.modules() if isinstance(m, Int8Linear))
    weight, _ = torch.ops.quantized.linear_unpack(layer._packed)
    assert weight.dtype == torch.qint8 and weight.shape == (layer.out_features, layer.in_features)
    assert engine.model.dtype == torch.float32  # activations, norms and the embedding stay fp32


def test_an_int8_engine_reads_as_the_fp32_one():
    """The embedded model (real weights, whose activations have outlier channels) reading a
    chat turn: int8 logits point where fp32's do, and the next-token choice is the same at
    most positions. (Without the smoothing of ``quantize_linears`` the agreement was 0.6.)"""
    fp32, int8 = TransformersEngine.load(device="cpu"), TransformersEngine.load(device="cpu", dtype="int8")
    ids = fp32.tokenizer.chat("The quick brown fox jumps over the lazy dog, and then it runs into "
                              "the forest to find its friends before the sun goes down.")
    a, b = fp32.verify(ids).all_logits, int8.verify(ids).all_logits
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert float(cosine.mean()) > 0.95 and float(agree) >= 0.8, (cosine.mean(), agree)
    assert not torch.allclose(a, b, atol=1e-3)  # quantized, not the fp32 model again


def test_an_int8_row_keeps_its_precision_beside_a_far_larger_row():
    """Each row is scaled to its own peak before fbgemm quantizes the call: a row read beside
    a row a thousand times larger (a prompt's first token) gives its product as alone, not
    flattened to the large row's range. (Rows of other signs still move the range's ends:
    not tested, as not promised; cpu_linear.py says so.)"""
    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(64, 32))
    row = torch.randn(1, 64)
    with torch.inference_mode():
        alone = layer(row)
        beside = layer(torch.cat([row * 1000, row]))[1:]
    torch.testing.assert_close(beside, alone, rtol=1e-5, atol=1e-5)
