"""Control vectors to and from other tools' files: bit-exact round trips, the exact GGUF
layout llama.cpp reads, the real repeng on both sides, and every bad file."""
from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.errors import BadArgumentError, CorruptFileError, ModelMismatchError
from max_jupyter.models import embedded_gguf_path
from max_jupyter.steering import Mix, SteeringVector, export_vector, import_vector
from max_jupyter.steering.interchange import hint_for
from repeng_support import hf_copy, repeng  # noqa: F401  (fixtures)

MODEL = ModelIdentity("Qwen2ForCausalLM", 8, 48, 1000, "a" * 64)
NARROW = ModelIdentity("Qwen2ForCausalLM", 8, 32, 1000, "b" * 64)
SHALLOW = ModelIdentity("Qwen2ForCausalLM", 4, 48, 1000, "c" * 64)
SUFFIXES = [".gguf", ".safetensors", ".pt", ".npy"]


def make(layers=(1, 4, 7), model=MODEL) -> SteeringVector:
    g = torch.Generator().manual_seed(sum(layers))
    d = {l: torch.randn(model.hidden_size, generator=g) for l in layers}
    d[layers[0]] = d[layers[0]] * 1e-40  # subnormals survive too
    return SteeringVector(d, model, "v")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_is_bit_exact(tmp_path, suffix):
    v = make()
    path = export_vector(v, tmp_path / f"joy{suffix}")
    back = import_vector(path, MODEL)
    assert back.layers == v.layers and back.label == "joy" and back.model == MODEL
    for layer in v.layers:
        assert back.directions[layer].numpy().tobytes() == v.directions[layer].numpy().tobytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_gguf_has_exactly_llama_cpps_layout(tmp_path):
    path = export_vector(make(), tmp_path / "joy.gguf")
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields == {"general.architecture": "controlvector",
                      "controlvector.model_hint": "qwen2", "controlvector.layer_count": 3}
    assert reader.fields["controlvector.layer_count"].types == [gguf.GGUFValueType.UINT32]
    assert [(t.name, t.tensor_type, [int(n) for n in t.shape]) for t in reader.tensors] == [
        (f"direction.{l}", gguf.GGMLQuantizationType.F32, [48]) for l in (1, 4, 7)]
    hinted = export_vector(make(), tmp_path / "hinted.gguf", model_hint="qwen2moe")
    assert gguf.GGUFReader(hinted).get_field("controlvector.model_hint").contents() == "qwen2moe"


def test_gguf_for_another_model_type_warns(tmp_path):
    path = export_vector(make(), tmp_path / "v.gguf", model_hint="gemma2")
    with pytest.warns(UserWarning, match="model type 'gemma2'"):
        assert import_vector(path, MODEL).layers == (1, 4, 7)


def test_gguf_refuses_layer_0_which_llama_cpp_rejects(tmp_path):
    with pytest.raises(BadArgumentError, match="layer 0.*select"):
        export_vector(make(layers=(0, 3)), tmp_path / "v.gguf")
    assert not list(tmp_path.iterdir())


def test_model_hint_from_architecture():
    assert hint_for(MODEL) == "qwen2"
    assert hint_for(ModelIdentity("LlamaForCausalLM", 1, 1, 1, "x")) == "llama"
    assert hint_for(ModelIdentity("GPT2LMHeadModel", 1, 1, 1, "x")) == "gpt2"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_width_mismatch_is_refused(tmp_path, suffix):
    path = export_vector(make(), tmp_path / f"v{suffix}")
    with pytest.raises(ModelMismatchError, match="32|Qwen2ForCausalLM"):
        import_vector(path, NARROW)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_layer_mismatch_is_refused(tmp_path, suffix):
    path = export_vector(make(layers=(1, 6)), tmp_path / f"v{suffix}")
    with pytest.raises(ModelMismatchError, match="layer|weights"):
        import_vector(path, SHALLOW)


def test_gguf_layer_count_beyond_the_model_is_refused(tmp_path):
    path = tmp_path / "v.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", "qwen2")
    writer.add_uint32("controlvector.layer_count", 40)
    writer.add_tensor("direction.1", np.ones(48, np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file,
                 writer.write_tensors_to_file, writer.close):
        step()
    with pytest.raises(ModelMismatchError, match="declares 40 layers"):
        import_vector(path, MODEL)


def test_files_that_are_not_control_vectors(tmp_path):
    cases = []
    text = tmp_path / "notes.gguf"
    text.write_text("not a gguf at all")
    cases.append((text, "not a GGUF file"))
    cases.append((embedded_gguf_path(), "not a control vector \\(general.architecture='llama'"))
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(48)], listed)
    cases.append((listed, "not a dict"))
    named = tmp_path / "named.pt"
    torch.save({"weight": torch.ones(48)}, named)
    cases.append((named, "'weight' is not a layer direction"))
    pickled = tmp_path / "dict.npy"
    np.save(pickled, {1: np.ones(48, np.float32)}, allow_pickle=True)
    cases.append((pickled, "pickled dict is refused"))
    vector_1d = tmp_path / "flat.npy"
    np.save(vector_1d, np.ones(48, np.float32))
    cases.append((vector_1d, "shape \\[48\\]"))
    garbage = tmp_path / "junk.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    cases.append((garbage, "not a safetensors file"))
    empty = tmp_path / "empty.safetensors"
    save_file({"other.1": torch.ones(48)}, empty)
    cases.append((empty, "'other.1' is not a layer direction"))
    for path, match in cases:
        with pytest.raises(CorruptFileError, match=match):
            import_vector(path, MODEL)


def test_our_safetensors_checks_the_full_identity(tmp_path):
    path = export_vector(make(), tmp_path / "v.safetensors")
    twin = ModelIdentity("Qwen2ForCausalLM", 8, 48, 1000, "f" * 64)  # same shape, other weights
    with pytest.raises(ModelMismatchError, match="not Qwen2ForCausalLM"):
        import_vector(path, twin)


def test_bad_paths(tmp_path):
    with pytest.raises(BadArgumentError, match="not an existing file"):
        import_vector(tmp_path / "missing.gguf", MODEL)
    with pytest.raises(BadArgumentError, match="'.txt'.*\\.gguf"):
        export_vector(make(), tmp_path / "v.txt")
    with pytest.raises(BadArgumentError, match="folder that does not exist"):
        export_vector(make(), tmp_path / "no" / "v.gguf")


# -- the real repeng ---------------------------------------------------------------------------

REPENG_LAYERS = [5, 10, 15]


@pytest.mark.slow
def test_repeng_gguf_loads_and_steers_identically(engine, repeng, hf_copy, tmp_path):
    model, tokenizer = hf_copy
    dataset = [repeng.DatasetEntry("I am so happy!", "I am so sad."),
               repeng.DatasetEntry("What a joyful day.", "What a gloomy day.")]
    trained = repeng.ControlVector.train(model, tokenizer, dataset, hidden_layers=REPENG_LAYERS,
                                         batch_size=1)
    path = tmp_path / "repeng.gguf"
    trained.export_gguf(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its model_hint "llama" matches ours: no warning
        ours = import_vector(path, engine.identity)
    for layer in REPENG_LAYERS:
        assert np.array_equal(ours.directions[layer].numpy(), trained.directions[layer])
    ids = tokenizer("Tell me how you feel:")["input_ids"]
    wrapped = repeng.ControlModel(model, REPENG_LAYERS)
    try:
        for coef in (0.0, 4.0, -4.0):
            wrapped.set_control(trained, coef)
            with torch.inference_mode():
                theirs = wrapped(torch.tensor([ids])).logits[0, -1]
            # repeng's coefficient r is ours r * push (docs/vectors.md)
            deltas = Mix.of(ours, coef * ours.push(engine.residual_norms)).deltas(engine)
            mine = engine.prefill(ids, deltas).logits
            torch.testing.assert_close(mine, theirs, atol=2e-4, rtol=1e-4)
        assert not torch.allclose(theirs, engine.prefill(ids).logits, atol=1e-2)  # it did steer
    finally:
        wrapped.unwrap()


@pytest.mark.slow
def test_our_gguf_loads_in_repeng(vector, repeng, tmp_path):
    path = export_vector(vector, tmp_path / "happy.gguf")
    theirs = repeng.ControlVector.import_gguf(path)
    assert theirs.model_type == "llama"
    assert sorted(theirs.directions) == list(vector.layers)
    for layer in vector.layers:
        assert np.array_equal(np.asarray(theirs.directions[layer]), vector.directions[layer].numpy())
