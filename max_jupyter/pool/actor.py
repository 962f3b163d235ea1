"""``SessionActor``: one worker of a ``SessionPool``, run by Ray as an actor in its own
process, holding one Session. Ray is not imported here: the pool wraps the class with
``ray.remote`` (as a threaded actor, so ``progress`` and ``stop`` answer while a share runs)."""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.evaluation.result import Evaluation
from max_jupyter.jupyter.steerspec import SteerTerm
from max_jupyter.jupyter.sweep import Sweep, run_sweep
from max_jupyter.orchestrator.options import GenerationOptions
from max_jupyter.orchestrator.trace import GenerationResult
from max_jupyter.orchestrator.types import Prompt
from max_jupyter.pool.values import SteeringValue, local_steering
from max_jupyter.session import Session
from max_jupyter.steering.vector import SteeringVector

INTERRUPT_EVERY_S = 0.1
"""How often a stopped share's Session is interrupted until the share returns (a job that
ignores one interrupt — a sweep's scoring — is followed by one that does not)."""


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
        self._job: object = None  # the id of the share running now (None: none runs)
        self._done = 0
        self._stop = threading.Event()
        self._stopped: set = set()  # shares stopped before they began
        self._lock = threading.Lock()  # between a share beginning or ending and stop()

    def load(self, big, small, options: dict) -> ActorInfo:
        """Load the models as ``Session.load(big, small, **options)`` does (vectors in a
        dict: the library stays in the notebook); raises its error if they do not load."""
        self._session = Session.load(big, small, store=None, progress=False, **options)
        engine = self._session.big
        small_engine = self._session.small
        return ActorInfo(engine.identity, small_engine.identity if small_engine is not None else None,
                         socket.gethostname(), os.getpid(), str(engine.device))

    def generate_batch(self, job: object, prompts: Sequence[Prompt], steering: Sequence[SteeringValue],
                       options: Sequence[GenerationOptions], batch_rows: int) -> list[GenerationResult]:
        """``Session.generate_batch`` of ``prompts[i]`` with ``steering[i]`` and
        ``options[i]``, ``batch_rows`` rows at a time, in order. After ``stop(job)`` the
        running batch ends before its next step (its rows ``"interrupted"``, with their
        partial text) and the rows not started come back empty, marked so."""
        def share() -> list[GenerationResult]:
            values = [local_steering(value) for value in steering]
            results: list[GenerationResult] = []
            for start in range(0, len(prompts), batch_rows):
                rows = slice(start, start + batch_rows)
                if self._stop.is_set():
                    results += [GenerationResult([], finish_reason="interrupted") for _ in prompts[rows]]
                    continue
                results += self._session.generate_batch(prompts[rows], values[rows], options[rows],
                                                        progress=False)
                self._done = len(results)
            return results

        return self._run(job, share)

    def sweep(self, job: object, prompt: str, term: SteerTerm, vector: SteeringVector,
              coefs: Sequence[float], options: GenerationOptions) -> Sweep:
        """``run_sweep`` of ``term`` (its vector sent as ``vector``) over ``coefs``; after
        ``stop(job)`` its batch ends before the next step and only finished rows are scored."""
        def share() -> Sweep:
            self._session.vectors[term.name] = vector
            return run_sweep(self._session, prompt, term, coefs, options, progress=False)

        return self._run(job, share)

    def evaluate(self, job: object, name: str | None, vector: SteeringVector | None, coefs: Sequence[float],
                 args: dict) -> Evaluation:
        """``Session.evaluate`` at ``coefs`` of ``vector`` (put in the library as ``name``
        where both are given), else of ``name`` (a library concept), with ``args``; after
        ``stop(job)`` it returns what it finished."""
        def share() -> Evaluation:
            if name is not None and vector is not None:
                self._session.vectors[name] = vector
            return self._session.evaluate(name if name is not None else vector, coefs=coefs,
                                          progress=False, **args)

        return self._run(job, share)

    def progress(self, job: object) -> int:
        """Rows of share ``job`` finished so far (0 if another share runs)."""
        return self._done if job == self._job else 0

    def stop(self, job: object) -> None:
        """Stop share ``job`` (no other) as Ctrl-C would stop it in a notebook: its Session
        is interrupted (``Session.interrupt``) until the share returns, and its batches not
        started do not start. A share not begun yet is stopped as it begins."""
        with self._lock:
            if job != self._job:
                self._stopped.add(job)
                return
            if self._stop.is_set():
                return
            self._stop.set()
        threading.Thread(target=self._interrupt_until_done, args=(job,), daemon=True,
                         name="max_jupyter-pool-stop").start()

    def _interrupt_until_done(self, job: object) -> None:
        while self._job == job:
            self._session.interrupt()
            time.sleep(INTERRUPT_EVERY_S)

    def _run(self, job: object, share: Callable[[], object]) -> object:
        """``share()`` as share ``job``: stoppable by ``stop(job)`` while it runs."""
        with self._lock:
            self._job, self._done = job, 0
            self._stop.clear()
            stopped = job in self._stopped
            self._stopped.discard(job)
        if stopped:
            self.stop(job)
        try:
            return share()
        finally:
            with self._lock:
                self._job = None

    def close(self) -> None:
        """Close the Session (the engines' memory goes back)."""
        if self._session is not None:
            self._session.close()
