"""The handle's event pump: any number of listeners get the same events in order (a late
one gets the past ones first), ``on_end`` after the last; a failing listener is dropped
without harm to the others or the generation; ``unsubscribe`` stops delivery. On the real
embedded model through a Session."""
from __future__ import annotations

import threading
import time

STEPS = 12


class Recorder:
    """A listener's callbacks: the events it got and the handle ``on_end`` gave it."""

    def __init__(self, fail_at: int | None = None):
        self.events, self.ended, self.fail_at = [], [], fail_at
        self.threads: set[str] = set()
        self.finished = threading.Event()

    def on_event(self, event) -> None:
        self.threads.add(threading.current_thread().name)
        if len(self.events) == self.fail_at:
            raise RuntimeError("this listener is broken")
        self.events.append(event)

    def on_end(self, handle) -> None:
        self.ended.append(handle)
        self.finished.set()


def start(session, **options):
    return session.start("Count to ten.", max_new_tokens=STEPS, ignore_eos=True,
                         on_event=lambda e: time.sleep(0.02), **options)


def test_listeners_see_the_same_events_in_order(session):
    handle = start(session)
    early = [Recorder() for _ in range(3)]
    for r in early:
        handle.subscribe(r.on_event, r.on_end)
    result = handle.result(timeout=120)
    late = Recorder()  # subscribed after the end: the whole replay, then on_end
    handle.subscribe(late.on_event, late.on_end)
    everything = list(handle.events())
    assert len([e for e in everything if e.record is not None]) == STEPS == len(result.steps)
    for r in [*early, late]:
        assert r.finished.wait(10)
        assert r.events == everything and r.ended == [handle]
        assert r.threads == {"max-jupyter-handle-pump"}
    assert "".join(e.text for e in late.events) == result.text


def test_a_failing_listener_harms_neither_the_others_nor_the_generation(session, caplog):
    handle = start(session)
    broken, good = Recorder(fail_at=3), Recorder()
    handle.subscribe(broken.on_event, broken.on_end)
    handle.subscribe(good.on_event, good.on_end)
    result = handle.result(timeout=120)
    assert good.finished.wait(10)
    assert handle.state == "done" and len(result.steps) == STEPS
    assert good.events == list(handle.events())
    assert len(broken.events) == 3 and broken.ended == []
    assert "a listener of a generation raised" in caplog.text


def test_unsubscribe_stops_delivery(session):
    handle = start(session)
    quitter, stayer = Recorder(), Recorder()
    listener = handle.subscribe(quitter.on_event, quitter.on_end)
    handle.subscribe(stayer.on_event, stayer.on_end)
    deadline = time.monotonic() + 60
    while len(quitter.events) < 3:
        assert time.monotonic() < deadline, "no events reached the listener"
        time.sleep(0.01)
    handle.unsubscribe(listener)
    got = len(quitter.events)
    handle.result(timeout=120)
    assert stayer.finished.wait(10)
    assert len(quitter.events) <= got + 1 < len(stayer.events) and quitter.ended == []


def test_the_pump_thread_ends_with_its_last_listener(session):
    handle = start(session)
    r = Recorder()
    handle.subscribe(r.on_event, r.on_end)
    handle.result(timeout=120)
    assert r.finished.wait(10)
    deadline = time.monotonic() + 5
    while any(t.name == "max-jupyter-handle-pump" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the pump thread outlived its listeners"
        time.sleep(0.01)
