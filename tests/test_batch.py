"""Batched generation (issue 23): the batch contract of ``BatchEngine`` on the transformers
backend (the embedded model, fp32 CPU) and ``Session.generate_batch`` on it and on the
scripted engine (which has no batch: its rows run one after another).

Shown: rows of different lengths, each with its own deltas and captures, give the logits
and states of the same ids fed alone; dropping finished rows leaves the others' next
logits; an interrupted step leaves the batch cache; the batch cache and the
single-sequence cache do not touch each other; greedy and seeded rows equal their
``generate`` runs token for token (steered per row, rows finishing early on EOS, a stop
string or their length); Ctrl-C mid-batch returns finished rows whole and live ones
marked; bad input (empty batch, a steering list of another length, a row over the
context, too many rows for memory, bad deltas and tokens) refused before any forward.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import scripted_session
from max_jupyter.errors import BadArgumentError, ContextOverflowError
from max_jupyter.orchestrator.options import GenerationOptions
from max_jupyter.orchestrator.trace import TraceConfig
from max_jupyter.steering import SteeringVector

TOL = 2.5e-4  # fp32 CPU: a batch's GEMMs block otherwise than one row's (tests/test_engine_contract.py)
PROMPTS = ["Hi", "Tell me a story about a dragon who loved tea.", "What is 2+2?", "Name three colors."]


def vectors(identity, seed: int = 1) -> list[SteeringVector]:
    g = torch.Generator().manual_seed(seed)
    h = identity.hidden_size
    return [SteeringVector({layer: torch.randn(h, generator=g) * size}, identity, label=f"v{layer}")
            for layer, size in [(8, 3.0), (12, 4.0), (20, 5.0)]]


def row_deltas(engine):
    v = vectors(engine.identity)
    return [v[0].deltas(1.0), None, (v[1] + v[2]).deltas(2.0), v[2].deltas(-1.0)]


def alone(engine, ids, deltas, tokens, capture):
    """Logits and captures of ``ids`` prefilled then ``tokens`` stepped, batch 1."""
    outs = [engine.prefill(ids, deltas, capture)]
    outs += [engine.step(t, deltas, capture) for t in tokens]
    return outs


@pytest.mark.slow
def test_rows_equal_their_batch_1_runs_and_leave_without_disturbing(engine):
    prompts = [engine.tokenizer.chat(p) for p in PROMPTS]
    deltas = row_deltas(engine)
    capture = [5, 12]
    batch = engine.prefill_batch(prompts, deltas, capture, reserve=6)
    fed = {r: [] for r in batch}
    outs = {r: [o] for r, o in batch.items()}
    for k in range(6):
        tokens = {r: int(o[-1].logits.argmax()) for r, o in outs.items() if r in engine.batch_lengths}
        if k == 2:  # the longest row leaves: its padding-only columns go too
            engine.drop_rows([1])
            del tokens[1]
        for r, t in tokens.items():
            fed[r].append(t)
        for r, o in engine.step_batch(tokens, {r: deltas[r] for r in tokens}, capture).items():
            outs[r].append(o)
    assert sorted(engine.batch_lengths) == [0, 2, 3]
    for r, ids in enumerate(prompts):
        ref = alone(engine, ids, deltas[r], fed[r], capture)
        assert len(ref) == len(outs[r])
        for a, b in zip(ref, outs[r]):
            torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=TOL)
            for layer in capture:
                assert b.hidden[layer].shape == a.hidden[layer].shape
                torch.testing.assert_close(b.hidden[layer], a.hidden[layer], rtol=0, atol=TOL)
    engine.reset_batch()


@pytest.mark.slow
def test_a_row_delta_shifts_its_own_row_only(engine):
    prompts = [engine.tokenizer.encode(p, True) for p in PROMPTS[:3]]
    delta = torch.zeros(engine.identity.hidden_size)
    delta[7] = 5.0
    plain = engine.prefill_batch(prompts, capture=[9])
    steered = engine.prefill_batch(prompts, [None, {9: delta}, None], capture=[9])
    for r in (0, 2):
        assert torch.equal(steered[r].hidden[9], plain[r].hidden[9])  # zero rows add exactly nothing
    torch.testing.assert_close(steered[1].hidden[9] - plain[1].hidden[9],
                               delta.expand_as(plain[1].hidden[9]), rtol=0, atol=1e-4)
    engine.reset_batch()


@pytest.mark.slow
def test_batch_and_single_caches_are_separate(engine):
    ids = engine.tokenizer.encode("The sky is", True)
    engine.prefill(ids)
    expected = engine.step(11).logits.clone()
    engine.rewind(1)
    batch = engine.prefill_batch([ids, ids[:2]], reserve=1)
    engine.step_batch({0: 11, 1: 11})
    torch.testing.assert_close(engine.step(11).logits, expected, rtol=0, atol=TOL)
    assert engine.seq_len == len(ids) + 1 and engine.batch_lengths == {0: len(ids) + 1, 1: 3}
    torch.testing.assert_close(batch[0].logits, engine.prefill(ids).logits, rtol=0, atol=TOL)
    engine.reset_batch()


@pytest.mark.slow
def test_an_interrupted_step_leaves_the_batch_cache(engine):
    prompts = [engine.tokenizer.encode(p, True) for p in PROMPTS[:2]]
    engine.prefill_batch(prompts, reserve=1)
    lengths = engine.batch_lengths

    def interrupt(*_):
        raise KeyboardInterrupt

    hook = engine.layers[17].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.step_batch({0: 42, 1: 43})
    finally:
        hook.remove()
    assert engine.batch_lengths == lengths
    after = engine.step_batch({0: 42, 1: 43})
    for r, p in enumerate(prompts):
        torch.testing.assert_close(after[r].logits, engine.prefill(p + [42 + r]).logits, rtol=0, atol=TOL)
    engine.reset_batch()


def bad_batch_calls(engine):
    """``(id, call, error, fragment)``: batch calls refused before compute."""
    h, layers = engine.identity.hidden_size, engine.identity.num_layers
    ok = [[1, 2, 3], [4, 5]]
    huge = torch.zeros(h)
    huge[0] = 1e6
    return [
        ("empty-batch", lambda: engine.prefill_batch([]), BadArgumentError, "prompts is empty"),
        ("prompts-str", lambda: engine.prefill_batch("hi"), BadArgumentError, "not a list of rows"),
        ("row-empty", lambda: engine.prefill_batch([[1], []]), BadArgumentError, r"prompts\[1\]=\[\] is empty"),
        ("row-vocab", lambda: engine.prefill_batch([[1], [10**6]]), BadArgumentError, "outside the vocabulary"),
        ("deltas-length", lambda: engine.prefill_batch(ok, [None]), BadArgumentError, "not a list of 2"),
        ("delta-shape", lambda: engine.prefill_batch(ok, [None, {3: torch.zeros(1, h)}]), BadArgumentError,
         "never broadcast"),
        ("delta-layer", lambda: engine.prefill_batch(ok, [{layers: torch.zeros(h)}, None]), BadArgumentError,
         "out of range"),
        ("delta-bound", lambda: engine.prefill_batch(ok, [None, {3: huge}]), BadArgumentError,
         "deltas of row 1 at layer 3"),
        ("capture", lambda: engine.prefill_batch(ok, capture=[layers]), BadArgumentError, "out of range"),
        ("row-context", lambda: engine.prefill_batch([[1], [1] * 10], reserve=engine.max_seq_len - 5),
         ContextOverflowError, r"prompts\[1\] needs"),
        ("memory", lambda: engine.prefill_batch([[1] * 8000] * 64), BadArgumentError,
         r"64 rows of up to 8000 positions need about .* GiB, .* free on cpu; split them"),
        ("reserve", lambda: engine.prefill_batch(ok, reserve=-1), BadArgumentError, "reserve=-1"),
    ]


def bad_step_calls(engine):
    h = engine.identity.hidden_size
    return [
        ("tokens-missing-row", lambda: engine.step_batch({0: 1}), BadArgumentError, "exactly the live rows"),
        ("tokens-extra-row", lambda: engine.step_batch({0: 1, 1: 1, 2: 1}), BadArgumentError,
         "exactly the live rows"),
        ("tokens-list", lambda: engine.step_batch([1, 1]), BadArgumentError, "exactly the live rows"),
        ("token-vocab", lambda: engine.step_batch({0: 1, 1: -1}), BadArgumentError, "outside the vocabulary"),
        ("deltas-dead-row", lambda: engine.step_batch({0: 1, 1: 1}, {5: None}), BadArgumentError,
         "not a mapping of live rows"),
        ("delta-width", lambda: engine.step_batch({0: 1, 1: 1}, {1: {2: torch.zeros(h + 1)}}), BadArgumentError,
         f"not \\[{h}\\]"),
        ("drop-dead-row", lambda: engine.drop_rows([7]), BadArgumentError, "not live rows"),

    ]


@pytest.mark.slow
def test_bad_batch_input_is_refused_before_compute(engine):
    engine.prefill_batch([[1, 2, 3], [4, 5]], reserve=1)
    expected = engine.step_batch({0: 6, 1: 6})
    engine.prefill_batch([[1, 2, 3], [4, 5]], reserve=1)
    for name, call, error, fragment in bad_batch_calls(engine) + bad_step_calls(engine):
        calls, lengths = engine.forward_calls, engine.batch_lengths
        with pytest.raises(error, match=fragment) as info:
            call()
        assert "\n" not in str(info.value), name
        assert (engine.forward_calls, engine.batch_lengths) == (calls, lengths), name
    after = engine.step_batch({0: 6, 1: 6})
    for r in (0, 1):
        torch.testing.assert_close(after[r].logits, expected[r].logits, rtol=0, atol=1e-6)
    calls = engine.forward_calls
    with pytest.raises(ContextOverflowError, match="row 0 holds 4 positions, all its prefill_batch reserved"):
        engine.step_batch({0: 7, 1: 7})  # past the reserved room
    assert engine.forward_calls == calls and engine.batch_lengths == {0: 4, 1: 3}
    engine.reset_batch()


# Session.generate_batch ---------------------------------------------------------------------


def row_steering(session):
    v = vectors(session.big.identity)
    session.vectors["v12"] = v[1]
    return [None, v[0], {"v12": 2.0}, v[2] * -1.0]


@pytest.mark.slow
def test_greedy_rows_equal_their_generate_runs(session):
    steering = row_steering(session)
    options = [GenerationOptions(max_new_tokens=n, stop=stop)
               for n, stop in [(20, ()), (30, ()), (12, ()), (25, ("e",))]]
    trace = TraceConfig(big_layers=(8,), top_k=5, prompt=True)
    batch = session.generate_batch(PROMPTS, steering, options, progress=False, trace=trace)
    for prompt, steer, o, b in zip(PROMPTS, steering, options, batch):
        a = session.generate(prompt, o, steering=steer, trace=trace)
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert b.big_topk.ids.tolist() == a.big_topk.ids.tolist()
        torch.testing.assert_close(b.big_hidden[8], a.big_hidden[8], rtol=0, atol=TOL)
        torch.testing.assert_close(b.prompt_hidden[8], a.prompt_hidden[8], rtol=0, atol=TOL)
        assert b.steered.tolist() == a.steered.tolist()
        for layer in a.deltas:
            assert torch.equal(b.deltas[layer], a.deltas[layer])
    reasons = {b.finish_reason for b in batch}
    assert "length" in reasons and len(reasons) > 1, reasons  # rows ended early, the others went on


@pytest.mark.slow
def test_seeded_rows_equal_their_generate_runs(session):
    steering = row_steering(session)
    options = [GenerationOptions(max_new_tokens=16).replace(temperature=0.9, top_p=0.95, seed=s)
               for s in (1, 2, 3, 4)]
    batch = session.generate_batch(PROMPTS, steering, options, progress=False)
    for prompt, steer, o, b in zip(PROMPTS, steering, options, batch):
        assert b.token_ids == session.generate(prompt, o, steering=steer).token_ids


def test_ctrl_c_mid_batch_returns_finished_and_partial_rows(session):
    options = [GenerationOptions(max_new_tokens=n, ignore_eos=True) for n in (2, 400, 3, 400)]

    def interrupt_soon():  # once the short rows have left, whatever the machine's load
        deadline = time.monotonic() + 120
        while set(session.big.batch_lengths) != {1, 3} and time.monotonic() < deadline:
            time.sleep(0.01)
        import _thread
        _thread.interrupt_main()

    threading.Thread(target=interrupt_soon).start()
    batch = session.generate_batch(PROMPTS, None, options, progress=False)
    assert [b.finish_reason for b in batch] == ["length", "interrupted", "length", "interrupted"]
    assert [len(b.token_ids) for b in batch[::2]] == [2, 3]
    for prompt, b in zip(PROMPTS[1::2], batch[1::2]):
        n = len(b.token_ids)
        assert 0 < n < 400 and len(b.steps) == n
        assert session.generate(prompt, max_new_tokens=n, ignore_eos=True).token_ids == b.token_ids
    assert not session.busy and session.big.batch_lengths == {}


def test_bad_batch_input_is_refused_before_any_forward(session):
    session.vectors["v12"] = vectors(session.big.identity)[1]
    big = session.big
    cases = [
        (lambda: session.generate_batch([]), BadArgumentError, "prompts=.* is empty"),
        (lambda: session.generate_batch("hi"), BadArgumentError, "not a list of prompts"),
        (lambda: session.generate_batch(PROMPTS, [None, None]), BadArgumentError,
         "holds 2 entries for 4 prompts"),
        (lambda: session.generate_batch(PROMPTS, options=[GenerationOptions()]), BadArgumentError,
         "one per prompt"),
        (lambda: session.generate_batch(["hi", [1] * big.max_seq_len]), ContextOverflowError,
         r"prompts\[1\]: "),
        (lambda: session.generate_batch([[1] * 8000] * 64, max_new_tokens=8), BadArgumentError,
         "64 rows of up to 8008 positions"),
        (lambda: session.generate_batch(["hi", ""]), BadArgumentError, r"prompts\[1\]: prompt='' is empty"),
        (lambda: session.generate_batch(PROMPTS, {"nope": 1.0}), BadArgumentError, "no vector named 'nope'"),
        (lambda: session.generate_batch(PROMPTS, judges=["x"]), BadArgumentError, "runs no small model"),
        (lambda: session.generate_batch(PROMPTS, speculate=2), BadArgumentError, "runs no small model"),
        (lambda: session.generate_batch(PROMPTS, max_new_tokens=0), BadArgumentError, "max_new_tokens"),
    ]
    for call, error, fragment in cases:
        calls = big.forward_calls
        with pytest.raises(error, match=fragment) as info:
            call()
        assert "\n" not in str(info.value)
        assert big.forward_calls == calls and big.batch_lengths == {}


def test_scripted_engine_rows_run_one_after_another():
    """An engine without a batch: the same results, row by row (and Ctrl-C there too)."""
    session = scripted_session()
    try:
        prompts = ["a b c", "d e", "f g h i"]
        batch = session.generate_batch(prompts, options=[GenerationOptions(max_new_tokens=n) for n in (5, 9, 3)],
                                       progress=False)
        assert [b.token_ids for b in batch] == [session.generate(p, max_new_tokens=n).token_ids
                                                for p, n in zip(prompts, (5, 9, 3))]
        assert not session.big.supports_batch
    finally:
        session.close()


@pytest.mark.slow
def test_a_sweep_runs_as_one_batch_with_the_rows_of_generate(session):
    from max_jupyter.jupyter.steerspec import SteerTerm
    from max_jupyter.jupyter.sweep import run_sweep

    session.vectors["v12"] = vectors(session.big.identity)[1]
    calls = session.big.forward_calls
    sweep = run_sweep(session, "Describe the sea.", SteerTerm("v12", 1.0, None), [-2.0, 0.0, 3.0],
                      progress=False, max_new_tokens=8)
    forwards = session.big.forward_calls - calls
    assert forwards <= 1 + 8 + 3 * 2  # (the norms measured once), a batch of 8 passes, 2 per row to score
    for coef, row in zip(sweep.coefs, sweep.rows):
        alone = session.generate("Describe the sea.", steering={"v12": coef}, max_new_tokens=8)
        assert row.result.token_ids == alone.token_ids and row.perplexity > 1.0
