"""The Session's worker and its generation handles on scripted engines (about 1 ms a
forward): events, replay, stop, busy, queued stops, errors on the worker and in callbacks,
Ctrl-C, awaiting, closing, re-entrant calls, and two threads sharing one session."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from conftest import scripted_session
from max_jupyter.errors import BusyError, SessionClosedError
from max_jupyter.orchestrator import CognitiveOrchestrator, FunctionJudge
from max_jupyter.orchestrator.judges import JudgeError
from max_jupyter.steering import Mix, SteeringVector

PROMPT = "Tell me about rain."
LONG = 3000  # longer than any test waits for


@pytest.fixture()
def session():
    s = scripted_session()
    yield s
    s.close()


def alone(session, **options) -> list[int]:
    """The tokens of one generation on the session's engine without the session."""
    return CognitiveOrchestrator(session.big, steering=options.pop("steering", None)).generate(
        PROMPT, **options).token_ids


def running(handle, steps: int = 0):
    """Wait until ``handle`` runs and has taken ``steps`` steps."""
    deadline = time.monotonic() + 30
    while (handle.state != "running" or handle.step < steps) and time.monotonic() < deadline:
        time.sleep(0.002)
    assert handle.state == "running" and handle.step >= steps
    return handle


def test_events_arrive_in_order_and_replay(session):
    on_worker = []
    h = session.start(PROMPT, max_new_tokens=12, on_event=on_worker.append)
    events = list(h.events(timeout=30))
    r = h.result()
    assert [e.record.step for e in events if e.record is not None] == list(range(12))
    assert "".join(e.text for e in events) == r.text == h.text and h.step == 12
    assert list(h.events()) == events == on_worker
    assert session.last is r and r.token_ids == alone(session, max_new_tokens=12)
    assert h.state == "done" and not session.busy


def test_stop_ends_within_one_step_and_is_idempotent(session):
    h = running(session.start(PROMPT, max_new_tokens=LONG, ignore_eos=True), steps=3)
    seen = h.step
    h.stop()
    r = h.result(30)
    assert r.finish_reason == "aborted" and h.state == "stopped"
    assert seen <= len(r.steps) <= seen + 1
    h.stop("interrupted")  # a no-op once finished
    assert h.state == "stopped" and r.finish_reason == "aborted"


def test_wait_false_refuses_while_busy(session):
    h = running(session.start(PROMPT, max_new_tokens=LONG, ignore_eos=True))
    assert session.busy
    with pytest.raises(BusyError, match="busy with another generation"):
        session.start(PROMPT, max_new_tokens=5, wait=False)
    h.stop()
    h.result(30)
    assert session.generate(PROMPT, max_new_tokens=3, wait=False).token_ids


def test_a_queued_generation_stops_at_once_and_the_handle_is_the_running_one(session):
    assert session.handle is None
    first = running(session.start(PROMPT, max_new_tokens=LONG, ignore_eos=True))
    queued = session.start(PROMPT, max_new_tokens=5)
    assert queued.state == "queued" and session.handle is first
    queued.stop()
    r = queued.result(0.5)  # at once, not after the running one
    assert queued.state == "stopped" and r.finish_reason == "aborted" and r.steps == []
    assert first.state == "running" and session.handle is first
    first.stop()
    first.result(30)
    assert session.handle is queued and not session.busy


def test_errors_on_the_worker_surface_and_the_session_goes_on(session):
    session.mixes["default"] = Mix(session.big.identity)

    def flaky(ctx):
        if ctx.step == 3:
            raise RuntimeError("judge broke")
        return False

    session.judges["flaky"] = FunctionJudge(flaky, name="flaky")
    h = session.start(PROMPT, max_new_tokens=10)
    with pytest.raises(JudgeError, match="judge broke") as info:
        h.result(30)
    assert h.state == "error" and h.error is info.value
    assert info.value.result.finish_reason == "error" and len(info.value.result.steps) == 3

    def loud(event):
        raise ValueError("display failed")

    h = session.start(PROMPT, max_new_tokens=10, judges=[], on_event=loud)
    with pytest.raises(ValueError, match="display failed") as info:
        h.result(30)
    assert len(info.value.result.steps) == 1
    assert session.generate(PROMPT, max_new_tokens=6, judges=[]).token_ids \
        == alone(session, max_new_tokens=6)


def test_ctrl_c_while_waiting_returns_the_partial_result(session):
    """Ctrl-C reaches ``generate`` in the waiting thread (here: raised by ``on_text``, which
    runs there): the generation stops within a step and the partial result comes back."""
    pieces = []

    def on_text(piece):
        pieces.append(piece)
        if len(pieces) == 4:
            raise KeyboardInterrupt

    r = session.generate(PROMPT, max_new_tokens=LONG, ignore_eos=True, on_text=on_text)
    assert r.finish_reason == "interrupted" and 4 <= len(r.steps) < LONG
    assert not session.busy and session.generate(PROMPT, max_new_tokens=3).token_ids


def test_await_leaves_the_event_loop_free(session):
    async def main():
        h = session.start(PROMPT, max_new_tokens=40)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while not h.done:
                ticks += 1
                await asyncio.sleep(0.002)

        task = asyncio.create_task(ticker())
        result = await h
        await task
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result.token_ids == alone(session, max_new_tokens=40) and ticks >= 3


def test_close_stops_the_running_generation_and_cancels_the_queued():
    session = scripted_session()
    first = running(session.start(PROMPT, max_new_tokens=LONG, ignore_eos=True))
    queued = session.start(PROMPT, max_new_tokens=5)
    session.close()
    assert first.result(5).finish_reason == "aborted" and first.state == "stopped"
    with pytest.raises(SessionClosedError, match="closed before this job ran"):
        queued.result(5)
    with pytest.raises(SessionClosedError, match="Session.load"):
        session.start(PROMPT)
    session.close()  # idempotent


def test_calls_from_the_worker_are_refused_not_deadlocked(session):
    with pytest.raises(BusyError, match="own worker"):
        session.run(lambda s: s.generate(PROMPT, max_new_tokens=2))
    seen = []
    h = session.start(PROMPT, max_new_tokens=3,
                      on_event=lambda e: seen.append(pytest.raises(BusyError, session.start, PROMPT)))
    h.result(30)
    assert len(seen) == 3 and session.run(lambda s: s.big.seq_len) > 0


def test_two_threads_each_get_their_own_generation(session):
    big = session.big
    push = SteeringVector({3: big.direction(big.tokenizer.encode(" the")[0], 40.0)}, big.identity, "p")
    want = {"plain": alone(session, max_new_tokens=16),
            "steered": alone(session, max_new_tokens=16, steering=push)}
    assert want["plain"] != want["steered"]
    got: dict[str, list[int]] = {}
    barrier = threading.Barrier(2)

    def call(name, **options):
        barrier.wait()
        got[name] = session.generate(PROMPT, max_new_tokens=16, **options).token_ids

    threads = [threading.Thread(target=call, args=("plain",)),
               threading.Thread(target=call, args=("steered",), kwargs={"steering": push})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == want


def test_a_live_mix_update_lands_whole_at_a_step_boundary(session):
    """Two entries changed at once from another thread while generating: every step ran
    with both or with neither."""
    big = session.big
    a = SteeringVector({1: big.direction(5, 3.0)}, big.identity, "a")
    b = SteeringVector({2: big.direction(9, 3.0)}, big.identity, "b")
    h = running(session.start(PROMPT, max_new_tokens=60, ignore_eos=True), steps=2)
    for i in range(20):
        session.mix.update({"a": (a, 0.1 * (1 + i)), "b": (b, 0.1 * (1 + i))})
        time.sleep(0.001)
    r = h.result(30)
    mixes = [record.live_coefs for record in r.steps]
    assert all(m == {} or m["a"] == m["b"] for m in mixes) and mixes[0] == {} and mixes[-1]


def test_interrupt_ends_the_running_job_as_ctrl_c_would(session):
    """``Session.interrupt()`` from another thread: a generation ends within a step as
    ``"interrupted"``, a batch before its next step with its rows marked; a no-op when
    nothing runs, and queued jobs are not touched."""
    session.interrupt()  # nothing runs: nothing happens
    h = running(session.start(PROMPT, max_new_tokens=LONG, ignore_eos=True), steps=3)
    queued = session.start(PROMPT, max_new_tokens=3)
    session.interrupt()
    r = h.result(30)
    assert r.finish_reason == "interrupted" and 3 <= len(r.steps) < LONG
    assert queued.result(30).finish_reason == "length"
    batch: list = []
    worker = threading.Thread(target=lambda: batch.extend(session.generate_batch(
        [PROMPT, "Hi"], max_new_tokens=LONG, ignore_eos=True, progress=False)))
    worker.start()
    deadline = time.monotonic() + 30
    while not session.busy and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(0.05)
    session.interrupt()
    worker.join(30)
    assert [row.finish_reason for row in batch] == ["interrupted", "interrupted"]
    assert all(len(row.token_ids) < LONG for row in batch) and not session.busy
