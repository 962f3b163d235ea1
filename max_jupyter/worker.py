"""``Worker``: the one thread that touches a Session's engines, running jobs one at a time
in submission order (see docs/design.md, "Threading model")."""
from __future__ import annotations

import collections
import logging
import threading
from typing import Protocol

from max_jupyter.errors import BusyError, SessionClosedError

log = logging.getLogger(__name__)


class Job(Protocol):
    """What a worker runs: ``run()`` on the worker thread, or ``cancel(error)`` if the
    worker closes before its turn; ``stop()`` asks a running job to end early; ``done``
    turns true once its result is out (its caller may go on). None of them may raise."""

    @property
    def done(self) -> bool: ...

    def run(self) -> None: ...

    def stop(self) -> None: ...

    def cancel(self, error: BaseException) -> None: ...


class Worker:
    """A daemon thread with a FIFO queue of jobs, started with the first job."""

    def __init__(self, name: str):
        self.name = name
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """A job is running (its result not out yet) or waiting."""
        with self._cond:
            return self._busy()

    def _busy(self) -> bool:
        jobs = [self._running, *self._queue] if self._running is not None else self._queue
        return any(not job.done for job in jobs)  # a job stopped while queued counts no more

    @property
    def running(self) -> Job | None:
        """The job running now, if any."""
        with self._cond:
            return self._running

    @property
    def on_worker(self) -> bool:
        """The caller is this worker's thread."""
        return threading.current_thread() is self._thread

    def submit(self, job: Job, wait: bool = True) -> None:
        """Queue ``job``; with ``wait=False`` raise ``BusyError`` instead if anything is
        running or queued. Raises ``SessionClosedError`` after ``close``."""
        if self.on_worker:  # it would wait for itself forever
            raise BusyError("called from the session's own worker (a callback, judge or run() "
                            "function): do the work directly there, or start it from another thread.")
        with self._cond:
            if self._closed:
                raise SessionClosedError("this session is closed; load a new one with Session.load().")
            if not wait and self._busy():
                raise BusyError("the session is busy with another generation; wait for it "
                                "(wait=True, the default), or stop it (handle.stop()).")
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Cancel the queued jobs, stop the running one, end the thread once it has ended."""
        with self._cond:
            self._closed = True
            queued, self._queue = list(self._queue), collections.deque()
            running = self._running
            self._cond.notify()
        if running is not None:
            running.stop()
        for job in queued:
            try:
                job.cancel(SessionClosedError("the session was closed before this job ran."))
            except Exception:  # one job's cleanup must not keep the others queued
                log.exception("cancelling a queued job failed")
        if self._thread is not None and not self.on_worker:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                self._running = self._queue.popleft()
            try:
                self._running.run()
            except BaseException:  # jobs report their own errors; this thread must live on
                log.exception("a job on %s raised", self.name)
            finally:
                with self._cond:
                    self._running = None
