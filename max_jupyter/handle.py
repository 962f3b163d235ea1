"""Jobs of a Session's worker: ``GenerationHandle`` (a generation the caller can watch,
stop and await) and ``CallJob`` (any function run on the worker)."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from max_jupyter.orchestrator.trace import GenerationResult, StepEvent

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Listener:
    """One subscriber of a handle's event pump (what ``subscribe`` returns): ``on_event``
    gets each ``StepEvent`` in order, ``on_end`` the handle once it has ended and every
    event has been delivered. ``seen``: events delivered so far."""

    on_event: Callable[[StepEvent], None]
    on_end: Callable[[GenerationHandle], None] | None = None
    seen: int = 0
    active: bool = True


class GenerationHandle:
    """A generation queued on or running on a Session's worker.

    ``state``: queued, running, done, stopped (``stop()`` ended it early) or error.
    ``step`` and ``text``: steps taken and text shown so far. ``events()`` replays every
    ``StepEvent`` from the first and waits for more, on the caller's thread;
    ``subscribe`` hands the same events to any number of listeners from one pump thread
    per handle; ``result()`` / ``await handle`` wait for the ``GenerationResult``.
    Thread-safe.
    """

    def __init__(self, generate: Callable[[GenerationHandle], GenerationResult],
                 prompt_ids: list[int], on_event: Callable[[StepEvent], None] | None = None):
        self._generate = generate
        self._prompt_ids = prompt_ids
        self._on_event = on_event
        self._cond = threading.Condition()
        self._events: list[StepEvent] = []
        self._state = "queued"
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._done_callbacks: list[Callable[[], None]] = []
        self._listeners: list[Listener] = []
        self._pump: threading.Thread | None = None  # runs while there are listeners
        self.abort = threading.Event()
        """Set by ``stop()``; the generation ends before its next step."""
        self.stop_reason = "aborted"
        self.step = 0
        self.text = ""

    def __repr__(self) -> str:
        return f"GenerationHandle({self.state}, {self.step} steps)"

    @property
    def state(self) -> str:
        return self._state

    @property
    def done(self) -> bool:
        return self._state in ("done", "stopped", "error")

    @property
    def error(self) -> BaseException | None:
        """The exception that ended the generation (state ``error``), else None."""
        return self._error

    def stop(self, reason: str = "aborted") -> None:
        """End the generation before its next step (its ``finish_reason`` becomes
        ``reason``); a queued one never starts. A no-op once it has finished."""
        with self._cond:
            if self.done:
                return
            self.stop_reason = reason
            self.abort.set()
            queued = self._state == "queued"
        if queued:  # it never starts: done now, not when the worker reaches it
            self._end("stopped", GenerationResult(list(self._prompt_ids), finish_reason=reason))

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the result (``TimeoutError`` after ``timeout`` s). A generation that
        failed raises its error, with the partial result on the error's ``result``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"the generation has not finished within {timeout} s "
                                   f"({self.step} steps so far).")
        if self._error is not None:
            raise self._error
        return self._result

    def __await__(self):
        return self._wait_async().__await__()

    async def _wait_async(self) -> GenerationResult:
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))
            except RuntimeError:  # that event loop has closed: nobody is waiting any more
                pass

        self._when_done(wake)
        await finished
        return self.result(0)

    def events(self, timeout: float | None = None) -> Iterator[StepEvent]:
        """Every event from the first, then new ones as they come, until the generation
        ends (``TimeoutError`` if none comes within ``timeout`` s)."""
        seen = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda seen=seen: len(self._events) > seen or self.done,
                                           timeout):
                    raise TimeoutError(f"no event within {timeout} s.")
                batch, finished = self._events[seen:], self.done
            yield from batch
            seen += len(batch)
            if finished and seen == len(self._events):
                return

    def subscribe(self, on_event: Callable[[StepEvent], None],
                  on_end: Callable[[GenerationHandle], None] | None = None) -> Listener:
        """Deliver every event from the first (a late subscriber gets the past ones first,
        as ``events()`` does) to ``on_event``, then call ``on_end(handle)`` once the
        generation has ended. Calls come in order from the handle's pump thread, one
        listener after another; a listener that raises is logged and unsubscribed, and
        neither the generation nor the other listeners notice. Returns the ``Listener``
        to pass to ``unsubscribe``."""
        listener = Listener(on_event, on_end)
        with self._cond:
            self._listeners.append(listener)
            if self._pump is None:
                self._pump = threading.Thread(target=self._run_pump, daemon=True,
                                              name="max-jupyter-handle-pump")
                self._pump.start()
            self._cond.notify_all()
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        """Stop delivering to ``listener`` (at most the event being delivered now still
        reaches it; ``on_end`` is not called). A no-op if it is not subscribed."""
        with self._cond:
            listener.active = False
            if listener in self._listeners:
                self._listeners.remove(listener)
            self._cond.notify_all()

    def _run_pump(self) -> None:
        """The pump thread: deliver new events to each listener, then ``on_end`` after
        the last; ends when no listener is left (``subscribe`` starts a new one)."""
        while True:
            with self._cond:
                self._cond.wait_for(self._pump_has_work)
                if not self._listeners:
                    self._pump = None
                    return
                finished = self.done
                work = [(l, self._events[l.seen:]) for l in self._listeners]
            for listener, batch in work:
                self._deliver(listener, batch, finished)

    def _pump_has_work(self) -> bool:
        return not self._listeners or self.done or any(
            l.seen < len(self._events) for l in self._listeners)

    def _deliver(self, listener: Listener, batch: list[StepEvent], finished: bool) -> None:
        """``batch`` to ``listener``, then its ``on_end`` if the generation had ``finished``
        when the batch was taken (so the batch holds every event)."""
        try:
            for event in batch:
                if not listener.active:
                    return
                listener.on_event(event)
                listener.seen += 1
            if finished and listener.active:
                self.unsubscribe(listener)
                if listener.on_end is not None:
                    listener.on_end(self)
        except Exception:  # one listener's trouble reaches neither the others nor the worker
            log.exception("a listener of a generation raised; it is unsubscribed")
            self.unsubscribe(listener)

    def _when_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the generation has finished (now, if it has)."""
        with self._cond:
            if not self.done:
                self._done_callbacks.append(callback)
                return
        callback()

    # The worker's side -----------------------------------------------------------------

    def run(self) -> None:
        """Run the generation (on the worker thread); never raises."""
        with self._cond:
            if self.done:  # stopped (or cancelled) while queued: no compute at all
                return
            self._state = "running"
            self._cond.notify_all()
        try:
            result = self._generate(self)
        except BaseException as e:  # surfaces in result(); the worker goes on
            self._end("error", error=e, result=getattr(e, "result", None))
            return
        if result.finish_reason == "aborted":
            result.finish_reason = self.stop_reason
        self._end("stopped" if self.abort.is_set() else "done", result=result)

    def cancel(self, error: BaseException) -> None:
        self._end("error", error=error, result=None)

    def push(self, event: StepEvent) -> None:
        """Record one event (the worker calls this for each) and pass it on."""
        with self._cond:
            self._events.append(event)
            if event.record is not None:
                self.step += 1
            self.text += event.text
            self._cond.notify_all()
        if self._on_event is not None:
            self._on_event(event)

    def _end(self, state: str, result: GenerationResult | None,
             error: BaseException | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self._state, self._result, self._error = state, result, error
            callbacks, self._done_callbacks = self._done_callbacks, []
            self._generate = None  # drop the run's engines and per-step tensors
            self._cond.notify_all()
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a waiter's trouble must not reach the worker
                log.exception("a callback of a finished generation raised")


class CallJob:
    """``fn()`` run on the worker; ``future`` holds its value or exception. ``cancelled``
    is set when the caller gives up (e.g. Ctrl-C): long functions check it and stop."""

    def __init__(self, fn: Callable[[CallJob], object]):
        self.fn = fn
        self.future: Future = Future()
        self.cancelled = threading.Event()

    def run(self) -> None:
        if self.cancelled.is_set():  # its caller gave up while it was queued
            self.cancel(KeyboardInterrupt())
            return
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn(self))
        except BaseException as e:
            self.future.set_exception(e)

    @property
    def done(self) -> bool:
        return self.future.done()

    def stop(self) -> None:
        self.cancelled.set()

    def cancel(self, error: BaseException) -> None:
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(error)
