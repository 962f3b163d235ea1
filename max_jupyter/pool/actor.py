"""``SessionActor``: one worker of a ``SessionPool``, run by Ray as an actor in its own
process, holding one Session. Ray is not imported here: the pool wraps the class with
``ray.remote`` (as a threaded actor, so ``progress`` and ``stop`` answer while a share runs)."""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.orchestrator.options import GenerationOptions
from max_jupyter.orchestrator.trace import GenerationResult
from max_jupyter.orchestrator.types import Prompt
from max_jupyter.pool.values import SteeringValue, local_steering
from max_jupyter.session import Session


@dataclass(frozen=True)
class ActorInfo:
    """Where a worker runs and what it loaded."""

    big: ModelIdentity
    small: ModelIdentity | None
    host: str
    pid: int
    device: str


class SessionActor:
    """One Session in this process. ``load`` first; then one share at a time (a later call
    waits for the Session's worker like any job); ``progress`` and ``stop`` from another
    thread of the actor at any time."""

    def __init__(self, threads: int | None = None):
        if threads is not None:  # a CPU worker uses its share of the cores, no more
            import torch

            torch.set_num_threads(threads)
        self._session: Session | None = None
        self._job: object = None  # the id of the share running now
        self._done = 0
        self._stop = threading.Event()
        self._stopped: set = set()  # shares stopped before they began
        self._lock = threading.Lock()  # between a share beginning and stop() from another thread

    def load(self, big, small, options: dict) -> ActorInfo:
        """Load the models as ``Session.load(big, small, **options)`` does (vectors in a
        dict: the library stays in the notebook); raises its error if they do not load."""
        self._session = Session.load(big, small, store=None, progress=False, **options)
        engine = self._session.big
        small_engine = self._session.small
        return ActorInfo(engine.identity, small_engine.identity if small_engine is not None else None,
                         socket.gethostname(), os.getpid(), str(engine.device))

    def generate_batch(self, job: object, prompts: Sequence[Prompt], steering: Sequence[SteeringValue],
                       options: GenerationOptions) -> list[GenerationResult]:
        """``prompts[i]`` with ``steering[i]``, in order; after ``stop(job)`` the running row
        ends as ``"interrupted"`` and the rows not started come back empty, marked so."""
        self._begin(job)
        results = []
        for prompt, value in zip(prompts, steering):
            if self._stop.is_set():
                results.append(GenerationResult([], finish_reason="interrupted"))
                continue
            handle = self._session.start(prompt, options, steering=local_steering(value))
            if self._stop.is_set():  # stop() came between the check and the start
                handle.stop("interrupted")
            results.append(handle.result())
            self._done += 1
        return results

    def progress(self, job: object) -> int:
        """Rows of share ``job`` finished so far (0 if another share runs)."""
        return self._done if job == self._job else 0

    def stop(self, job: object) -> None:
        """Stop share ``job`` (no other): its running generation within one step, its rows
        not started at all."""
        with self._lock:
            if job != self._job:
                self._stopped.add(job)
                return
            self._stop.set()
        handle = self._session.handle
        if handle is not None:
            handle.stop("interrupted")

    def _begin(self, job: object) -> None:
        with self._lock:
            self._job, self._done = job, 0
            self._stop.clear()
            if job in self._stopped:
                self._stopped.discard(job)
                self._stop.set()

    def close(self) -> None:
        """Close the Session (the engines' memory goes back)."""
        if self._session is not None:
            self._session.close()
