"""Running one pooled job: share ``i`` of the rows on actor ``i``, all at once, with one
progress bar over every row; an actor that dies has its share re-run on a replacement
(the share's rows come back once, from the replacement); Ctrl-C stops every share and
keeps what finished. See docs/cluster.md."""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from max_jupyter.errors import MaxJupyterError, PoolWorkerError
from max_jupyter.pool.runtime import Actors, Slot, describe, import_ray

POLL_S = 0.2
"""How often the bar asks the actors how far their shares are."""
STOP_WAIT_S = 30.0
"""After Ctrl-C, how long the stopped shares may take to send back what they finished."""
MAX_RETRIES = 2
"""Replacements one share may have before the job fails."""


@dataclass(frozen=True)
class Share:
    """The job's rows ``rows`` (positions in its input) for one actor: the actor method
    ``method`` and its arguments (values that travel)."""

    rows: range
    method: str
    args: tuple


@dataclass(frozen=True)
class Retry:
    """The share of rows ``rows`` was re-run on a replacement of actor ``actor``, which
    died (``error``)."""

    rows: range
    actor: int
    error: str


@dataclass
class PoolJob:
    """How a pooled job went (``result.job`` of every pool result). ``retries``: shares
    re-run after their actor died; ``interrupted``: Ctrl-C stopped it, and the rows then
    come back finished, partial or empty, each partial or empty one marked as the Session
    marks an interrupted one."""

    actors: int
    rows: int
    retries: list[Retry] = field(default_factory=list)
    interrupted: bool = False
    elapsed_s: float = 0.0

    @property
    def retried(self) -> bool:
        return bool(self.retries)


def run_job(actors: Actors, shares: list[Share], job: PoolJob, desc: str, progress: bool) -> list:
    """Run ``shares`` (at most one per actor), recording in ``job``; returns each share's
    value in share order (None for a share that Ctrl-C stopped before it answered)."""
    from tqdm.auto import tqdm

    run = _Run(actors, shares, job)
    with tqdm(total=run.job.rows, desc=desc, unit="row", disable=not progress) as bar:
        try:
            run.loop(bar if progress else None)
        except KeyboardInterrupt:
            run.interrupt()
    job.elapsed_s = time.perf_counter() - run.started
    return run.values


class _Run:
    """The state of one job: the Ray calls in flight and what each share returned."""

    def __init__(self, actors: Actors, shares: list[Share], job: PoolJob):
        self.ray = import_ray()
        self.actors, self.shares, self.job = actors, shares, job
        self.values: list = [None] * len(shares)
        self.done = [0] * len(shares)  # rows finished per share (as last polled)
        self.attempts = [0] * len(shares)
        self.pending: dict = {}  # Ray reference -> (share, slot, "load" or "work")
        self.tag = uuid.uuid4().hex[:8]
        self.started = time.perf_counter()
        for i in range(len(shares)):
            slot = actors.slots[i]
            if slot.info is None:  # a replacement from an earlier job, still loading
                self.pending[slot.loaded] = (i, slot, "load")
            else:
                self._submit(i, slot)

    def _job_id(self, i: int) -> str:
        return f"{self.tag}-{i}-{self.attempts[i]}"

    def _submit(self, i: int, slot: Slot) -> None:
        share = self.shares[i]
        ref = getattr(slot.handle, share.method).remote(self._job_id(i), *share.args)
        self.pending[ref] = (i, slot, "work")

    def loop(self, bar) -> None:
        while self.pending:
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=POLL_S)
            for ref in ready:
                self._settle(ref)
            if bar is not None:
                self._poll()
                if sum(self.done) != bar.n:
                    bar.update(sum(self.done) - bar.n)

    def _settle(self, ref) -> None:
        i, slot, stage = self.pending.pop(ref)
        try:
            value = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as e:  # the actor (process, node) died
            self._retry(i, slot, e)
            return
        except Exception as e:
            self._fail(i, slot, stage, e)
        if stage == "load":
            slot.info = value
            self._submit(i, slot)
        else:
            self.values[i], self.done[i] = value, len(self.shares[i].rows)

    def _retry(self, i: int, slot: Slot, error: Exception) -> None:
        rows = self.shares[i].rows
        self.attempts[i] += 1
        if self.attempts[i] > MAX_RETRIES:
            self._stop_all()
            raise PoolWorkerError(f"rows {rows.start}..{rows.stop - 1}: actor {slot.index} died "
                                  f"{self.attempts[i]} times (last: {describe(error)}); the job is "
                                  f"abandoned.") from None
        self.job.retries.append(Retry(rows, slot.index, describe(error)))
        self.done[i] = 0  # nothing of the dead actor's share came back
        replacement = self.actors.replace(slot)
        self.pending[replacement.loaded] = (i, replacement, "load")

    def _fail(self, i: int, slot: Slot, stage: str, error: Exception):
        """A share raised (not a death): stop the others and raise its error, one line."""
        self._stop_all()
        cause = getattr(error, "cause", None)
        if isinstance(cause, MaxJupyterError):  # the Session's own refusal, as it is
            raise rebased(cause, self.shares[i].rows.start) from None
        what = "load the models" if stage == "load" else "run its share"
        rows = self.shares[i].rows
        raise PoolWorkerError(f"actor {slot.index} failed to {what} (rows {rows.start}.."
                              f"{rows.stop - 1}): {describe(error)}") from None

    def _poll(self) -> None:
        """Ask each running share how many rows it has finished (answers that take longer
        than a moment are left for the next poll)."""
        asked = {slot.handle.progress.remote(self._job_id(i)): i
                 for i, slot, stage in self.pending.values() if stage == "work"}
        ready, _ = self.ray.wait(list(asked), num_returns=len(asked), timeout=POLL_S / 2)
        for ref in ready:
            try:
                self.done[asked[ref]] = max(self.done[asked[ref]], self.ray.get(ref))
            except self.ray.exceptions.RayError:  # a dying actor: its share's call says so
                pass

    def _stop_all(self) -> list:
        """Ask every running share to stop; returns their references."""
        running = [(ref, i, slot) for ref, (i, slot, stage) in self.pending.items() if stage == "work"]
        for _ref, i, slot in running:
            slot.handle.stop.remote(self._job_id(i))
        return [ref for ref, _i, _slot in running]

    def interrupt(self) -> None:
        """Ctrl-C: stop every share, keep what each sends back within ``STOP_WAIT_S`` (a
        second Ctrl-C stops waiting); cancel the rest."""
        self.job.interrupted = True
        running = self._stop_all()
        try:
            self.ray.wait(running, num_returns=len(running), timeout=STOP_WAIT_S)
        except KeyboardInterrupt:
            pass
        for ref in running:
            i, _slot, _stage = self.pending.pop(ref)
            ready, _ = self.ray.wait([ref], timeout=0)
            if not ready:
                self.ray.cancel(ref)
                continue
            try:
                self.values[i] = self.ray.get(ref)
            except self.ray.exceptions.RayError:  # died while stopping: its rows are lost
                pass


def rebased(error: MaxJupyterError, offset: int) -> MaxJupyterError:
    """``error`` from a share whose first row is the job's row ``offset``, with the rows it
    names (``prompts[1]``) numbered as the job's (``prompts[4]``)."""
    if offset and len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (re.sub(r"\bprompts\[(\d+)\]", lambda m: f"prompts[{int(m[1]) + offset}]", error.args[0]),)
    return error
