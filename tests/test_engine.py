"""The engine contract on the reference backend, with the real embedded model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import hf_forward
from max_jupyter.engines import ContextOverflowError
from max_jupyter.errors import BadArgumentError, ModelSourceError

pytestmark = pytest.mark.slow  # the embedded model

PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def ids(engine):
    return engine.tokenizer.encode(PROMPT, add_special_tokens=True)


def test_identity(engine):
    ident = engine.identity
    assert (ident.architecture, ident.num_layers, ident.hidden_size, ident.vocab_size) == (
        "LlamaForCausalLM", 30, 576, 49152)
    assert len(ident.fingerprint) == 64


def test_prefill_logits_equal_plain_hf_forward(engine, hf_model, ids):
    ref = hf_forward(hf_model, ids).logits[0, -1]
    out = engine.prefill(ids)
    assert engine.seq_len == len(ids)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)


def test_capture_equals_hf_hidden_states(engine, hf_model, ids):
    layers = [0, 7, 15, 28, 29]
    out = engine.prefill(ids, capture=layers)
    ref = hf_forward(hf_model, ids, output_hidden_states=True).hidden_states
    for i in layers[:-1]:
        assert out.hidden[i].shape == (len(ids), 576)
        torch.testing.assert_close(out.hidden[i], ref[i + 1][0], rtol=1e-5, atol=1e-5)
    # HF's last entry is after the final norm; capture at the last block is the raw residual.
    last = out.hidden[29][None]
    torch.testing.assert_close(hf_model.model.norm(last)[0], ref[30][0], rtol=1e-5, atol=1e-5)


def test_steps_equal_one_prefill(engine, ids):
    whole = engine.prefill(ids, capture=[5])
    engine.prefill(ids[:4])
    for t in ids[4:]:
        step = engine.step(t, capture=[5])
    assert step.hidden[5].shape == (1, 576)
    torch.testing.assert_close(step.logits, whole.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step.hidden[5][0], whole.hidden[5][-1], rtol=1e-4, atol=1e-4)


def test_rewind_then_restep_equals_scratch(engine, ids):
    engine.prefill(ids)
    engine.step(11)
    engine.step(22)
    engine.rewind(2)
    assert engine.seq_len == len(ids)
    restep = engine.step(33).logits
    scratch = engine.prefill(ids + [33]).logits
    torch.testing.assert_close(restep, scratch, rtol=1e-4, atol=1e-4)
    with pytest.raises(BadArgumentError, match=r"is out of range; rewind 0\.\."):
        engine.rewind(engine.seq_len + 1)


def test_zero_delta_gives_exact_logits(engine, ids):
    plain = engine.prefill(ids).logits
    zero = engine.prefill(ids, deltas={3: torch.zeros(576), 20: torch.zeros(576)}).logits
    assert torch.equal(plain, zero)


def test_delta_changes_downstream_capture_by_itself(engine, ids):
    delta = torch.randn(576)
    plain = engine.prefill(ids, capture=[4]).hidden[4]
    steered = engine.prefill(ids, deltas={4: delta}, capture=[4]).hidden[4]
    torch.testing.assert_close(steered - plain, delta.expand_as(plain), rtol=1e-4, atol=1e-4)


def test_layer_out_of_range(engine, ids):
    with pytest.raises(BadArgumentError, match=r"out of range.*0\.\.29"):
        engine.prefill(ids, deltas={30: torch.zeros(576)})
    with pytest.raises(BadArgumentError, match="capture"):
        engine.prefill(ids, capture=[-1])


def test_context_overflow_is_refused_before_compute(engine, ids):
    engine.prefill(ids)
    with pytest.raises(ContextOverflowError, match="exceed the context of 8192"):
        engine.forward([1] * 8192)
    assert engine.seq_len == len(ids)
    with pytest.raises(BadArgumentError, match=r"ids=\[\] is empty"):
        engine.prefill([])
    assert engine.seq_len == len(ids)


def test_interrupt_mid_forward_leaves_cache_as_before(engine, ids):
    before = engine.prefill(ids).logits

    def interrupt(*_):
        raise KeyboardInterrupt

    handle = engine.layers[17].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.step(42)
    finally:
        handle.remove()
    assert engine.seq_len == len(ids)
    after = engine.step(42).logits
    torch.testing.assert_close(after, engine.prefill(ids + [42]).logits, rtol=1e-4, atol=1e-4)
    assert before.shape == after.shape


def model_folder(path, config: dict):
    """A folder that passes the file checks: config.json and a (header-less) weights file."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_exllamav2_load_refuses_bad_input_before_importing_exllamav2(tmp_path):
    """Each mistake gets a typed one-line error naming argument, value and fix, before
    exllamav2 is imported (on this machine, without CUDA or exllamav2, any later step would
    raise BackendUnavailableError instead)."""
    from max_jupyter.engines.exllamav2 import load_engines, load_pair

    llama = model_folder(tmp_path / "llama", {"architectures": ["LlamaForCausalLM"]})
    gpt2 = model_folder(tmp_path / "gpt2", {"architectures": ["GPT2LMHeadModel"]})
    yarn = model_folder(tmp_path / "yarn", {"architectures": ["Qwen2ForCausalLM"],
                                           "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    cases = [
        (lambda: load_pair(llama, llama, max_vram_gb=0), BadArgumentError, "max_vram_gb=0.0 is out of range"),
        (lambda: load_pair(llama, llama, max_vram_gb="16"), BadArgumentError, "max_vram_gb='16' is a str"),
        (lambda: load_pair(llama, llama, cache_tokens=True), BadArgumentError, "cache_tokens=True is a bool"),
        (lambda: load_pair(llama, llama, cache_tokens=-5), BadArgumentError, "cache_tokens=-5 is out of range"),
        (lambda: load_engines([("big", llama)], max_input_len=0), BadArgumentError, "max_input_len=0"),
        (lambda: load_pair(llama, gpt2), BadArgumentError, "GPT2LMHeadModel model, which the ExLlamaV2"),
        (lambda: load_pair(yarn, llama), BadArgumentError, "rope_type 'yarn'.*copy rope_parameters"),
        (lambda: load_pair(llama, tmp_path / "nowhere"), ModelSourceError, "does not exist"),
    ]
    for call, error, fragment in cases:
        with pytest.raises(error, match=fragment) as info:
            call()
        assert "\n" not in str(info.value)


def test_memory_plan_refuses_a_cache_longer_than_the_models_positions():
    from max_jupyter.engines.exllamav2 import GiB, ModelMemory, plan_memory

    model = ModelMemory("big", "/models/big", weights=GiB, scratch=0, cache_per_token=1024,
                        sincos_per_token=0, prefill_fixed=0, prefill_per_token=0,
                        host_embedding=0, max_positions=4096)
    assert plan_memory([model], max_vram_gb=8, cache_tokens=4096).cache_tokens == 4096
    with pytest.raises(BadArgumentError, match=r"cache_tokens=8192 exceeds .* \(4096\); pass cache_tokens <= 4096"):
        plan_memory([model], max_vram_gb=8, cache_tokens=8192)


def test_exllamav2_package_imports_lightly():
    code = ("import sys; from max_jupyter.engines.exllamav2 import ExLlamaV2Engine, load_pair, plan_memory; "
            "print(sorted(m for m in ('transformers', 'exllamav2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
