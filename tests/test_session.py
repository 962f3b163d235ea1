"""The Session on the real embedded model: one worker serialises callers, handles report and
stop generations, the live mix changes whole at step boundaries, failures stay contained."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from max_jupyter import Session
from max_jupyter.errors import (
    BackendUnavailableError,
    BadArgumentError,
    BusyError,
    ModelSourceError,
    SessionClosedError,
    UnknownNameError,
)
from max_jupyter.orchestrator import Always, DivergenceJudge, FunctionJudge, GenerationOptions, SamplingConfig, generate
from max_jupyter.orchestrator.mirror import MirrorError
from max_jupyter.orchestrator.sampling import Sampler
from max_jupyter.orchestrator.types import prompt_ids
from max_jupyter.steering import Mix, SteeringVector
from max_jupyter.testing import build_tiny_model

pytestmark = pytest.mark.slow  # Sessions of the embedded model

PROMPT = "Name three colours."
N = 10


def alone(engine, prompt=PROMPT, **options) -> list[int]:
    """Token ids of the same generation on a fresh session of its own."""
    with Session(engine) as s:
        return s.generate(prompt, **options).token_ids


def test_two_threads_each_get_their_own_generation(engine, vector):
    steered = {"steering": Mix.of(vector, 0.5)}
    want_plain, want_steered = alone(engine, max_new_tokens=N), alone(engine, max_new_tokens=N, **steered)
    assert want_plain != want_steered  # the steering matters, so a leak would show
    s = Session(engine)
    got: dict[str, list[int]] = {}
    barrier = threading.Barrier(2)

    def call(name, **options):
        barrier.wait()
        got[name] = s.generate(PROMPT, max_new_tokens=N, **options).token_ids

    threads = [threading.Thread(target=call, args=("plain",)),
               threading.Thread(target=call, args=("steered",), kwargs=steered)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    s.close()
    assert got == {"plain": want_plain, "steered": want_steered}


def test_wait_false_refuses_while_busy(session):
    h = session.start(PROMPT, max_new_tokens=200, ignore_eos=True)
    with pytest.raises(BusyError, match="busy"):
        session.start(PROMPT, max_new_tokens=5, wait=False)
    h.stop()
    h.result(60)
    assert session.generate(PROMPT, max_new_tokens=3, wait=False).token_ids  # free again


def record_deltas(engine, seen: list):
    """Wrap the engine's backend forward to record the deltas it receives (one per call)."""
    inner = engine._forward

    def spy(ids, deltas, capture):
        seen.append({l: d.clone() for l, d in deltas.items()})
        return inner(ids, deltas, capture)
    return spy


class SlowEntries(dict):
    """The mix's entry table with a pause after each write: it widens the moment between
    the two writes of an update, where a reader without the mix's lock would see
    half of it."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        time.sleep(0.002)


def test_mix_update_lands_whole_at_a_step_boundary(engine, vector):
    a = vector.select([10])
    b = SteeringVector({12: torch.randn(576)}, engine.identity, "b")
    pairs = [(1.0, 1.0), (-1.0, 2.0)]
    s = Session(engine)
    s.mix.update({"a": (a, 1.0), "b": (b, 1.0)})
    s.mix._entries = SlowEntries(s.mix._entries)
    seen: list[dict] = []
    engine._forward = record_deltas(engine, seen)
    stop = threading.Event()

    def flip():
        i = 0
        while not stop.is_set():
            i += 1
            ca, cb = pairs[i % 2]
            s.mix.update({"a": ca, "b": cb})

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        result = s.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    finally:
        stop.set()
        flipper.join()
        del engine._forward
        s.close()
    unit_a = a.deltas(1.0, engine.residual_norms)[10]  # what coefficient 1 adds
    unit_b = b.deltas(1.0, engine.residual_norms)[12]
    coefs = {(round(float(d[10] @ unit_a / (unit_a @ unit_a)), 3),
              round(float(d[12] @ unit_b / (unit_b @ unit_b)), 3)) for d in seen}
    assert coefs <= set(pairs) and len(coefs) == 2  # both pairs seen, never a mix of them
    recorded = {(r.live_coefs["a"], r.live_coefs["b"]) for r in result.steps}
    assert recorded <= set(pairs)


def test_stop_ends_within_one_step(session):
    h = session.start(PROMPT, max_new_tokens=300, ignore_eos=True)
    for _event in h.events(timeout=60):
        if h.step >= 3:
            break
    seen = h.step
    h.stop()
    r = h.result(60)
    assert r.finish_reason == "aborted" and h.state == "stopped"
    assert seen <= len(r.steps) <= seen + 1
    h.stop()  # a no-op once finished
    assert h.state == "stopped"


def test_events_arrive_in_order_and_replay(session):
    seen_on_worker = []
    h = session.start(PROMPT, max_new_tokens=N, on_event=seen_on_worker.append)
    events = list(h.events(timeout=60))
    r = h.result()
    steps = [e.record.step for e in events if e.record is not None]
    assert steps == list(range(len(r.steps)))
    assert "".join(e.text for e in events) == r.text == h.text
    assert list(h.events()) == events == seen_on_worker  # replayed from the first
    assert session.last is r


def test_worker_exception_surfaces_and_session_stays_usable(session, engine, vector):
    session.mixes["default"] = Mix.of(vector)

    def flaky(ctx):
        if ctx.step == 3:
            raise RuntimeError("judge broke")
        return False

    session.judges["flaky"] = FunctionJudge(flaky, name="flaky")
    h = session.start(PROMPT, max_new_tokens=N)
    with pytest.raises(Exception, match="judge broke") as info:
        h.result(60)
    assert h.state == "error" and h.error is info.value
    assert info.value.result.finish_reason == "error" and len(info.value.result.steps) == 3

    def loud(event):
        raise ValueError("display failed")

    h = session.start(PROMPT, max_new_tokens=N, judges=[], on_event=loud)
    with pytest.raises(ValueError, match="display failed") as info:
        h.result(60)
    assert len(info.value.result.steps) == 1
    assert session.generate(PROMPT, max_new_tokens=N, judges=[]).token_ids == alone(engine, max_new_tokens=N)


def test_ctrl_c_while_waiting_returns_the_partial_result(session):
    def interrupt_soon():
        time.sleep(1.0)
        import _thread
        _thread.interrupt_main()

    threading.Thread(target=interrupt_soon).start()
    r = session.generate(PROMPT, max_new_tokens=400, ignore_eos=True)
    assert r.finish_reason == "interrupted" and 0 < len(r.steps) < 400
    assert session.generate(PROMPT, max_new_tokens=3).token_ids  # usable afterwards


def reference_loop(engine, ids, n, deltas=None, sampling=SamplingConfig()) -> list[int]:  # noqa: B008 (frozen)
    """The plain loop as it was before it became the orchestrator: prefill, sample, step."""
    sampler, out = Sampler(sampling), []
    logits = engine.prefill(ids, deltas).logits
    while True:
        token, _ = sampler.sample(logits)
        if token in engine.tokenizer.eos_ids:
            return out
        out.append(token)
        if len(out) >= n:
            return out
        logits = engine.step(token, deltas).logits


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.9, top_p=0.95, seed=3)],
                         ids=["greedy", "seeded"])
@pytest.mark.parametrize("steered", [False, True])
def test_unified_loop_gives_the_plain_loops_tokens(engine, vector, sampling, steered):
    steering = Mix.of(vector, 0.4) if steered else None
    deltas = steering.deltas(engine) if steered else None
    want = reference_loop(engine, prompt_ids(engine, PROMPT), 16, deltas, sampling)
    got = generate(engine, PROMPT, max_new_tokens=16, sampling=sampling, steering=steering)
    assert got.token_ids == want


def test_options_are_checked_before_queueing(session):
    with pytest.raises(BadArgumentError, match="unknown generation option"):
        session.start(PROMPT, max_tokens=5)
    with pytest.raises(BadArgumentError, match="no vector named 'glee'"):  # 'joy' is a concept
        session.start(PROMPT, steering={"glee": 1.0})
    with pytest.raises(BadArgumentError, match="no judge named"):
        session.start(PROMPT, judges=["strict"])
    with pytest.raises(BadArgumentError, match="system="):
        session.start([1, 2, 3], system="Be brief.")
    assert session.handle is None and not session.busy


def test_options_are_one_typed_object(session):
    """Keywords become a GenerationOptions at once: the same tokens as the object itself;
    session.defaults is one (frozen: a new one replaces it); a misspelt name is refused
    with the closest one, before anything is queued."""
    typed = session.generate(PROMPT, GenerationOptions(max_new_tokens=N, ignore_eos=True).replace(
        temperature=0.9, seed=4))
    keywords = session.generate(PROMPT, max_new_tokens=N, ignore_eos=True, temperature=0.9, seed=4)
    assert typed.token_ids == keywords.token_ids and len(typed.token_ids) == N
    session.defaults = session.defaults.replace(max_new_tokens=3, ignore_eos=True)
    assert len(session.generate(PROMPT).token_ids) == 3
    assert session.defaults.sampling == SamplingConfig()  # replace changed only what it named
    with pytest.raises(BadArgumentError, match="did you mean 'temperature'"):
        session.start(PROMPT, temprature=0.5)
    with pytest.raises(BadArgumentError, match="not GenerationOptions"):
        session.defaults = {"max_new_tokens": 3}
    with pytest.raises(BadArgumentError, match="not GenerationOptions"):
        session.start(PROMPT, {"max_new_tokens": 3})
    assert session.handle is not None and session.defaults.max_new_tokens == 3


def test_add_judge_brings_its_mixes_and_remove_judge_takes_them(engine, small, tiny, vector):
    """The Session owns judges and the mixes they turn on: add_judge checks with the
    orchestrator's rules before anything changes; remove_judge removes what it added
    unless another judge still turns it on."""
    with Session(engine, small) as s:
        s.add_judge("calm", Always("calm", name="calm"), mixes={"calm": vector})
        s.add_judge("also", Always("calm", name="also"))
        assert set(s.judges) == {"calm", "also"} and isinstance(s.mixes["calm"], Mix)
        r = s.generate(PROMPT, max_new_tokens=3)
        assert all(step.mixes_on == ("calm",) and step.steered for step in r.steps)
        assert s.remove_judge("calm") == [] and "calm" in s.mixes  # "also" still turns it on
        assert s.remove_judge("also") == ["calm"] and s.mixes == {}
        with pytest.raises(UnknownNameError, match="no judge named 'also'"):
            s.remove_judge("also")
        with pytest.raises(UnknownNameError, match="turns on mix"):
            s.add_judge("x", Always("nope", name="x"), mixes={"other": vector})
        with pytest.raises(BadArgumentError, match="not a Judge"):
            s.add_judge("x", "calm")
        assert s.judges == {} and s.mixes == {}  # a refused judge changes nothing
    with Session(engine, tiny) as s:  # another tokenizer: the vocabularies are compared
        with pytest.raises(BadArgumentError, match="different vocabularies"):
            s.add_judge("kl", DivergenceJudge(1.0, "kl"), mixes={"default": vector})
        assert s.judges == {} and s.mixes == {}


def test_result_records_the_live_mix_it_started_with(session, vector):
    """A slider left in an old cell steers the next run: the result says so at once."""
    session.mix.set("happy", vector, -0.4)
    moved = lambda event: event.record and event.record.step == 1 and session.mix.set_coef("happy", 0.3)
    r = session.generate(PROMPT, max_new_tokens=4, on_event=moved)
    assert r.start_mix == {"happy": -0.4} == r.steps[0].live_coefs
    assert r.steps[-1].live_coefs == {"happy": 0.3}  # a change mid-run leaves start_mix as it was


def test_call_steering_by_name_and_system_prompt(session, engine, vector):
    session.vectors["happy"] = vector
    by_name = session.generate(PROMPT, max_new_tokens=N, steering={"happy": 0.5}).token_ids
    assert by_name == alone(engine, max_new_tokens=N, steering=Mix.of(vector, 0.5))
    live = session.mix
    live.set("happy", vector, 0.5)  # the live mix and the call's steering add up
    both = session.generate(PROMPT, max_new_tokens=N, steering={"happy": 0.5}).token_ids
    assert both == alone(engine, max_new_tokens=N, steering=Mix.of(vector, 1.0))
    live.clear()
    system = session.generate(PROMPT, max_new_tokens=N, system="Answer in French.")
    assert system.prompt_ids == engine.tokenizer.chat(
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": PROMPT}])


def test_train_runs_on_the_worker_and_fills_the_library(session):
    v = session.train("joy", ["I am happy.", "What joy!"], ["I am sad.", "What misery."],
                      layers=[12], method="mean_diff", progress=False)
    assert session.vectors["joy"] is v and v.layers == (12,)


def test_run_executes_on_the_worker(session):
    worker = session.run(lambda s: threading.current_thread().name)
    assert worker.startswith("max_jupyter-session") and worker != threading.current_thread().name
    with pytest.raises(ZeroDivisionError):
        session.run(lambda s: 1 / 0)


def test_closed_session_refuses_use(engine):
    s = Session(engine)
    h = s.start(PROMPT, max_new_tokens=300, ignore_eos=True)
    next(h.events(timeout=60))  # running
    queued = s.start(PROMPT, max_new_tokens=5)
    s.close()
    assert h.done and h.state == "stopped"
    with pytest.raises(SessionClosedError):
        queued.result(10)
    for use in (lambda: s.generate(PROMPT), lambda: s.start(PROMPT), lambda: s.big,
                lambda: s.run(len), lambda: s.train("x", ["a"], ["b"])):
        with pytest.raises(SessionClosedError, match="Session.load"):
            use()
    s.close()  # idempotent


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        Session.load(tmp_path, store=None, progress=False)
    with pytest.raises(BackendUnavailableError, match="pip install 'max-jupyter\\[gpu\\]'"):
        Session.load(backend="exllamav2", store=None, progress=False)
    with pytest.raises(BadArgumentError, match="backend='vllm'"):
        Session.load(backend="vllm", store=None, progress=False)


def test_dtype_is_refused_on_the_exllama_backends(monkeypatch, tmp_path):
    """Where exllamav2 is present (stood in for here: the refusal comes before any load),
    ``dtype`` is refused with the backend named, not ignored."""
    import max_jupyter.loading as loading

    monkeypatch.setattr(loading, "exllamav2_available", lambda: True)
    with pytest.raises(BadArgumentError, match="dtype='int8' applies to the transformers backend only"):
        loading.load_models(build_tiny_model(tmp_path), None, backend="exllamav2", dtype="int8")


def test_a_small_model_that_cannot_mirror_is_refused_at_load(engine, tiny):
    class Blind:  # an engine without a tokenizer, of another vocabulary
        identity = tiny.identity
    with pytest.raises(MirrorError, match="no tokenizer"):
        Session(engine, Blind())


def test_load_with_a_mirrored_small_model(tmp_path):
    s = Session.load(small="same", store=None, progress=False)
    r = s.generate(PROMPT, max_new_tokens=4)
    assert s.small is not s.big and r.small_ids[-len(r.token_ids):] == r.token_ids
    assert r.small_topk.ids.shape[0] == len(r.steps)
    s.close()


@pytest.mark.parametrize("module", ["max_jupyter", "max_jupyter.steering", "max_jupyter.orchestrator"])
def test_light_import(module):
    code = (f"import sys, {module}; from max_jupyter.steering import SteeringVector; "
            f"print(sorted(m for m in ('transformers', 'exllamav2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reentrant_and_failing_calls_do_not_hang(session):
    with pytest.raises(BusyError, match="own worker"):
        session.run(lambda s: s.generate(PROMPT, max_new_tokens=2))
    with pytest.raises(TimeoutError, match="from fn"):  # fn's own TimeoutError, not a wait
        session.run(lambda s: (_ for _ in ()).throw(TimeoutError("from fn")))

    def broken(piece):
        raise ValueError("display broke")

    with pytest.raises(ValueError, match="display broke"):
        session.generate(PROMPT, max_new_tokens=300, ignore_eos=True, on_text=broken)
    assert session.handle.result(30).finish_reason == "error" and not session.busy


def test_handle_is_the_running_generation(session):
    """``session.handle`` is the generation running now, not one started later and queued
    behind it (what the mixer's Stop button stops); then the last one started."""
    assert session.handle is None
    running = session.start(PROMPT, max_new_tokens=300, ignore_eos=True)
    deadline = time.monotonic() + 30
    while running.state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = session.start(PROMPT, max_new_tokens=3)
    assert queued.state == "queued" and session.handle is running
    running.stop()
    running.result(60)
    queued.result(60)
    assert session.handle is queued


def test_stopping_a_queued_generation_ends_it_at_once(session):
    running = session.start(PROMPT, max_new_tokens=300, ignore_eos=True)
    queued = session.start(PROMPT, max_new_tokens=5)
    queued.stop()
    r = queued.result(0.5)  # not after the running one: at once
    assert queued.state == "stopped" and r.finish_reason == "aborted" and r.steps == []
    assert running.state in ("queued", "running")
    running.stop()
    running.result(60)
    assert not session.busy


def test_a_load_shows_one_progress_bar_and_refused_input_none(session, capfd):
    """Ours ("loading"), not transformers' "Loading weights" too (switched back on after);
    a load or a training refused for bad input opens no bar at all."""
    from transformers.utils import logging as hf_logging

    Session.load(small="same", store=None).close()
    err = capfd.readouterr().err
    assert "loading: 100%" in err and "Loading weights" not in err, err
    assert hf_logging.is_progress_bar_enabled()
    with pytest.raises(BadArgumentError, match="cache_tokens|max_seq_len"):
        Session.load(cache_tokens=0, store=None)
    with pytest.raises(BadArgumentError, match="method"):
        session.train("x", ["good"], ["bad"], method="nope")
    err = capfd.readouterr().err
    assert "loading" not in err and "training" not in err, err


def test_devices_place_big_and_small_each_on_its_own(engine, small):
    """``Session.load(devices=(big's, small's))``: each model on its device (both "cpu" on
    this machine; "cuda:0" and "cuda:1" on two GPUs), and the pair generates as with
    ``device=``."""
    with Session.load(small="same", devices=("cpu", "cpu"), store=None, progress=False) as placed:
        assert (placed.big.device.type, placed.small.device.type) == ("cpu", "cpu")
        result = placed.generate("Hi", max_new_tokens=4)
    with Session(engine, small) as reference:
        assert result.token_ids == reference.generate("Hi", max_new_tokens=4).token_ids
