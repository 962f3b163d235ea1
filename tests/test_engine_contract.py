"""The engine contract, run against every backend present: the scripted engine
(``max_jupyter.testing``) and transformers (the embedded model, CPU, marked ``slow``)
everywhere; ExLlamaV2 on a GPU with exllamav2 installed (a random fp16 Llama built by
the parity tests' builder), marked ``gpu`` and skipped elsewhere; ExLlamaV3 on a GPU with
exllamav3 (a random Qwen2 converted to EXL3, tests/test_exllamav3_gpu.py), marked ``exl3``.

Checked: bad arguments are refused by ``Engine.forward`` / ``rewind`` / ``unembed`` before
any compute (no forward counted, the cache and the next logits unchanged); steps equal one
prefill; captures have ``[n_fed, hidden]`` rows; rewind; zero deltas change nothing; a
delta shifts the residual it is added to by exactly itself; ``unembed`` of the last
layer's residual is the forward's logits; ``verify`` rows equal steps, also with deltas
per position.
"""
from __future__ import annotations

import functools

import pytest
import torch

from max_jupyter.engines.base import Engine
from max_jupyter.errors import BadArgumentError, ContextOverflowError
from max_jupyter.testing import ScriptedEngine
from test_exllamav2_parity import build_model, tokenizer_folder  # noqa: F401 (a fixture)

BACKENDS = [
    pytest.param("scripted", id="scripted"),
    pytest.param("transformers", id="transformers", marks=pytest.mark.slow),
    pytest.param("exllamav2", id="exllamav2", marks=[pytest.mark.gpu, pytest.mark.slow]),
    pytest.param("exllamav3", id="exllamav3", marks=[pytest.mark.exl3, pytest.mark.slow]),
]
TOLERANCE = {"scripted": 1e-6, "transformers": 2.5e-4, "exllamav2": 2e-2,  # absolute, logits and states
             "exllamav3": 0.25}
# exllamav3: its decode path (graphed attention block, fused MLP, one-row GEMM) and its n-row
# path differ by up to 0.12 in these logits (|logits| ~3; H100, test_exllamav3_gpu.py).
# transformers: fp32 on the CPU, where a pass over n rows blocks its GEMMs otherwise than n
# one-row steps; the difference depends on the CPU's SIMD path (1.25e-4 seen on one
# 2-core x86 box, logits of magnitude ~20), so the bound leaves room for another CPU.
PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tmp_path_factory):
    """``(name, engine)`` for each backend present."""
    if request.param == "scripted":
        yield "scripted", ScriptedEngine()
        return
    if request.param == "transformers":
        yield "transformers", request.getfixturevalue("engine")
        return
    if request.param == "exllamav3":
        from max_jupyter.engines.exllamav3 import ExLlamaV3Engine
        from test_exllamav3_gpu import exl3_folder

        engine = ExLlamaV3Engine.load(exl3_folder(), cache_tokens=2048)
        yield "exllamav3", engine
        engine.unload()
        return
    from max_jupyter.engines.exllamav2 import ExLlamaV2Engine

    folder = tmp_path_factory.mktemp("exl-fp16")
    build_model("LlamaForCausalLM", folder, request.getfixturevalue("tokenizer_folder"))
    torch.cuda.empty_cache()
    engine = ExLlamaV2Engine.load(folder, cache_tokens=2048)
    yield "exllamav2", engine
    engine.unload()


@pytest.fixture
def eng(backend):
    return backend[1]


@pytest.fixture
def tol(backend):
    return TOLERANCE[backend[0]]


@pytest.fixture
def ids(eng):
    return eng.tokenizer.encode(PROMPT, add_special_tokens=True)


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=0, atol=tol)


def with_value(rows: torch.Tensor, value: float) -> torch.Tensor:
    """``rows`` with ``value`` in column 3 of every row."""
    rows[:, 3] = value
    return rows


def bad_calls(eng):
    """``(id, call, fragment)``: wrong arguments every backend must refuse before compute."""
    hidden, layers, vocab = eng.identity.hidden_size, eng.identity.num_layers, eng.identity.vocab_size
    z = torch.zeros(hidden)
    return [
        ("empty-ids", lambda: eng.forward([]), r"ids=\[\] is empty"),
        ("id-negative", lambda: eng.forward([-1]), "outside the vocabulary"),
        ("id-vocab", lambda: eng.forward([vocab]), "outside the vocabulary"),
        ("id-bool", lambda: eng.step(True), r"\(bool\)"),
        ("id-float", lambda: eng.forward([1.0]), r"\(float\)"),
        ("ids-str", lambda: eng.forward("hello"), "not a list of token ids"),
        ("delta-scalar", lambda: eng.forward([1], {0: torch.tensor(1.0)}), "shape \\[\\]"),
        ("delta-rows", lambda: eng.forward([1], {0: torch.zeros(1, hidden)}), "never broadcast"),
        ("delta-width", lambda: eng.forward([1], {0: torch.zeros(hidden + 1)}), f"not \\[{hidden}\\]"),
        ("delta-not-tensor", lambda: eng.forward([1], {0: [0.0] * hidden}), "is a list"),
        ("delta-layer-unknown", lambda: eng.forward([1], {layers: z}), "out of range"),
        ("delta-layer-float", lambda: eng.forward([1], {0.5: z}), r"\(float\)"),
        ("deltas-not-mapping", lambda: eng.forward([1], [z]), "not a mapping"),
        ("capture-unknown", lambda: eng.forward([1], capture=[layers]), "out of range"),
        ("capture-negative", lambda: eng.prefill([1], capture=[-1]), "out of range"),
        ("capture-str", lambda: eng.forward([1], capture="0"), "is a str"),
        ("rewind-past-start", lambda: eng.rewind(eng.seq_len + 1), "is out of range; rewind 0"),
        ("rewind-negative", lambda: eng.rewind(-1), "is out of range"),
        ("rewind-float", lambda: eng.rewind(1.0), r"n=1.0 is a float"),
        ("rewind-bool", lambda: eng.rewind(True), r"n=True is a bool"),
        ("unembed-list", lambda: eng.unembed([[0.0] * hidden]), "is a list, not a tensor"),
        ("unembed-1d", lambda: eng.unembed(z), rf"shape \[{hidden}\], not \[n, {hidden}\]"),
        ("unembed-3d", lambda: eng.unembed(z[None, None]), rf"shape \[1, 1, {hidden}\]"),
        ("unembed-no-rows", lambda: eng.unembed(torch.zeros(0, hidden)), "with n >= 1"),
        ("unembed-width", lambda: eng.unembed(torch.zeros(2, hidden + 1)), f"not \\[n, {hidden}\\]"),
        ("unembed-int", lambda: eng.unembed(torch.zeros(2, hidden, dtype=torch.long)),
         "not a floating-point dtype"),
        ("unembed-nan", lambda: eng.unembed(with_value(torch.zeros(2, hidden), float("nan"))),
         "holds 2 non-finite"),
        ("unembed-inf", lambda: eng.unembed(with_value(torch.zeros(1, hidden), float("inf"))),
         "holds 1 non-finite"),
    ]


def test_bad_arguments_are_refused_before_compute(eng, ids, tol):
    eng.prefill(ids)
    expected = eng.step(5).logits.clone()
    eng.rewind(1)
    for name, call, fragment in bad_calls(eng):
        calls, seq_len = eng.forward_calls, eng.seq_len
        with pytest.raises(BadArgumentError, match=fragment):
            call()
        assert (eng.forward_calls, eng.seq_len) == (calls, seq_len), name
    close(eng.step(5).logits, expected, tol)


def test_context_overflow_is_refused_before_compute(eng, ids):
    eng.prefill(ids)
    calls = eng.forward_calls
    with pytest.raises(ContextOverflowError, match=f"exceed the context of {eng.max_seq_len}"):
        eng.forward([1] * (eng.max_seq_len - len(ids) + 1))
    with pytest.raises(ContextOverflowError):
        eng.prefill([1] * (eng.max_seq_len + 1))
    assert eng.forward_calls == calls and eng.seq_len == len(ids)


def test_forward_calls_count_each_pass(eng, ids):
    calls = eng.forward_calls
    eng.prefill(ids)
    eng.step(7)
    eng.forward([8, 9])
    assert eng.forward_calls == calls + 3 and eng.seq_len == len(ids) + 3


def test_steps_equal_one_prefill_with_captures(eng, ids, tol):
    last = eng.identity.num_layers - 1
    whole = eng.prefill(ids, capture=[0, last])
    assert whole.logits.shape == (eng.identity.vocab_size,)
    assert whole.hidden[0].shape == (len(ids), eng.identity.hidden_size)
    eng.prefill(ids[:3])
    for t in ids[3:]:
        step = eng.step(t, capture=[last])
    assert set(step.hidden) == {last} and step.hidden[last].shape == (1, eng.identity.hidden_size)
    close(step.logits, whole.logits, tol)
    close(step.hidden[last][0], whole.hidden[last][-1], tol * 10)  # residuals are larger


def test_rewind_then_restep_equals_scratch(eng, ids, tol):
    eng.prefill(ids)
    eng.step(11)
    eng.step(22)
    eng.rewind(2)
    assert eng.seq_len == len(ids)
    close(eng.step(33).logits, eng.prefill(ids + [33]).logits, tol)


def test_zero_deltas_change_nothing_and_a_delta_shifts_its_layer(eng, ids, tol):
    hidden = eng.identity.hidden_size
    plain = eng.prefill(ids, capture=[1])
    zero = eng.prefill(ids, deltas={0: torch.zeros(hidden), 1: torch.zeros(hidden)})
    close(zero.logits, plain.logits, tol)
    delta = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    steered = eng.prefill(ids, deltas={1: delta}, capture=[1]).hidden[1]
    close(steered - plain.hidden[1], delta.expand(len(ids), hidden), tol * 10)


def test_verify_rows_equal_per_token_steps(eng, ids, tol):
    """``verify`` returns the logits after every fed token and per-position captures, with
    the same deltas at each position, as the same tokens fed one step at a time."""
    hidden, last = eng.identity.hidden_size, eng.identity.num_layers - 1
    deltas = {1: torch.randn(hidden, generator=torch.Generator().manual_seed(1))}
    draft = [11, 22, 33, 44]
    eng.prefill(ids)
    out = eng.verify(draft, deltas, capture=[1, last])
    assert eng.seq_len == len(ids) + len(draft)
    assert out.all_logits.shape == (len(draft), eng.identity.vocab_size)
    assert torch.equal(out.logits, out.all_logits[-1])
    assert out.hidden[last].shape == (len(draft), hidden)
    eng.rewind(len(draft))
    for j, token in enumerate(draft):
        step = eng.step(token, deltas, capture=[1, last])
        close(out.all_logits[j], step.logits, tol)
        close(out.hidden[last][j], step.hidden[last][0], tol * 10)  # residuals are larger
    eng.rewind(3)  # a rejected tail goes back like any positions
    close(eng.step(22, deltas).logits, out.all_logits[1], tol)


@pytest.mark.parametrize("passes", ["backend's", "one per run"])
def test_verify_with_deltas_per_position_equals_steps_steered_alike(eng, ids, tol, passes, monkeypatch):
    """``verify`` with one set of deltas per position (``None`` for none) steers each
    position as ``step`` with its deltas would: the backend's own way (the transformers
    backend: one pass) and the base class's, one verify per run of equal deltas."""
    if passes == "one per run":
        monkeypatch.setattr(eng, "_verify_runs", functools.partial(Engine._verify_runs, eng))
    hidden, last = eng.identity.hidden_size, eng.identity.num_layers - 1
    g = torch.Generator().manual_seed(2)
    up, down = {1: torch.randn(hidden, generator=g)}, {1: torch.randn(hidden, generator=g)}
    draft, per_position = [11, 22, 33, 44, 55], [up, None, None, down, up]
    eng.prefill(ids)
    calls = eng.forward_calls
    out = eng.verify(draft, per_position, capture=[1, last])
    runs = 4 if passes == "one per run" or type(eng)._verify_runs is Engine._verify_runs else 1
    assert eng.forward_calls - calls == runs and eng.seq_len == len(ids) + len(draft)
    eng.rewind(len(draft))
    for j, (token, deltas) in enumerate(zip(draft, per_position)):
        step = eng.step(token, deltas, capture=[1, last])
        close(out.all_logits[j], step.logits, tol)
        close(out.hidden[1][j], step.hidden[1][0], tol * 10)
    for bad in (per_position[:-1], [up, None, None, down, "up"]):
        with pytest.raises(BadArgumentError, match="one per id"):
            eng.verify(draft, bad)
    assert eng.seq_len == len(ids) + len(draft)


def test_unembed_of_the_last_layer_is_the_forward_logits(eng, ids, tol):
    """``unembed`` (final norm + head) of the last layer's captured residual gives the logits
    of every position; from any device and float dtype; it touches no cache, counts no forward."""
    last, vocab = eng.identity.num_layers - 1, eng.identity.vocab_size
    eng.prefill(ids[:1])
    out = eng.verify(ids[1:], capture=[last])
    expected = eng.step(5).logits.clone()
    eng.rewind(1)
    calls, seq_len = eng.forward_calls, eng.seq_len
    logits = eng.unembed(out.hidden[last])
    assert logits.shape == (len(ids) - 1, vocab) and logits.dtype == torch.float32
    close(logits, out.all_logits, tol)
    close(eng.unembed(out.hidden[last][-1:].float().cpu())[0], out.logits, tol)
    assert (eng.forward_calls, eng.seq_len) == (calls, seq_len)
    close(eng.step(5).logits, expected, tol)


def test_logit_lens_at_the_last_layer_reads_the_models_distribution(eng, ids, tol):
    """The logit lens runs through the contract (``unembed``) on every backend: at the last
    layer its top-k probabilities are the generation's own next-token probabilities."""
    from max_jupyter.jupyter.lens import logit_lens
    from max_jupyter.orchestrator import CognitiveOrchestrator, TraceConfig

    last = eng.identity.num_layers - 1
    result = CognitiveOrchestrator(eng).generate(ids, max_new_tokens=6, ignore_eos=True,
                                                 trace=TraceConfig(big_layers=(0, last), full_logits=True))
    lens = logit_lens(eng, result, k=4)
    assert lens.ids.shape == (2, 6, 4) and lens.token_ids == tuple(r.token for r in result.steps)
    model = torch.softmax(result.big_logits.float(), -1).gather(1, lens.ids[-1])  # [steps, k]
    close(lens.probs[-1], model, tol)
