"""The Ray side of a pool: joining or starting a Ray runtime, how many actors it can hold
and with what resources, and the actors themselves (started, loaded, replaced, ended).
Ray is imported here, when a pool starts, never when ``max_jupyter`` is imported."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from max_jupyter.errors import BackendUnavailableError, PoolWorkerError
from max_jupyter.pool.actor import ActorInfo, SessionActor
from max_jupyter.validation import fail

CLUSTER_INSTALL = "pip install 'max-jupyter[cluster]'"


def import_ray():
    """The ``ray`` module, or ``BackendUnavailableError`` naming the install."""
    try:
        import ray
    except ImportError:
        raise BackendUnavailableError(f"SessionPool runs on Ray, which is not installed; install it "
                                      f"with {CLUSTER_INSTALL} (on every machine of the cluster).") from None
    return ray


def connect(address: str | None) -> bool:
    """Join the Ray runtime at ``address`` ("auto", "ray://host:port", a head's host:port),
    or start a local one (None); a runtime this process already joined is used as it is.
    A cluster that cannot be joined is ``BackendUnavailableError`` naming the token setting
    (unless ``RAY_AUTH_MODE`` is set: then Ray's error). Returns whether this call started
    or joined it (so the pool should leave it at close)."""
    if import_ray().is_initialized():
        return False
    try:
        init_ray(address=address)
    except ConnectionError as e:
        if address is None or os.environ.get("RAY_AUTH_MODE"):
            raise
        # a `ray start` cluster asks for its token; ray.init only logs the auth error
        raise BackendUnavailableError(
            f"could not join the Ray cluster at {address!r} ({e}); a cluster started with `ray start` "
            f"requires its token: set RAY_AUTH_MODE=token with the head's ~/.ray/auth_token on this "
            f"machine (docs/cluster.md), or check the address.") from None
    return True


STARTS = 5
"""Tries to start a local Ray node: Ray gives its node 30 s to come up, which a machine
crowded with other processes can miss."""


def init_ray(**options) -> None:
    """``ray.init(**options)`` quietly (no dashboard, warnings only), tried up to ``STARTS``
    times while the node times out during startup."""
    ray = import_ray()
    for attempt in range(STARTS):
        try:
            ray.init(include_dashboard=False, logging_level=logging.WARNING, configure_logging=False,
                     **options)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == STARTS - 1:
                raise
            ray.shutdown()


@dataclass(frozen=True)
class Placement:
    """``workers`` actors, each reserving ``num_cpus`` cores and ``num_gpus`` GPUs; a CPU
    actor runs torch on ``threads`` threads (its share of the cores)."""

    workers: int
    num_cpus: int
    num_gpus: int

    @property
    def threads(self) -> int | None:
        return None if self.num_gpus else self.num_cpus


def placement(workers: int | None, gpus_wanted: bool) -> Placement:
    """One actor per free GPU of the runtime (``num_gpus=1``) where it has GPUs and the
    models may use them, else one per share of the free CPU cores: ``workers`` (None: one
    per core) actors with an equal share each. More actors than the runtime has room for
    now (other actors hold the rest) are refused, rather than left waiting."""
    free = import_ray().available_resources()
    cpus, gpus = int(free.get("CPU", 0)), int(free.get("GPU", 0))
    if gpus and gpus_wanted:
        workers = gpus if workers is None else workers
        if workers > gpus:
            raise fail("workers", workers, f"is more than the runtime's {gpus} free GPU(s) (one actor "
                       f"each)", f"pass workers <= {gpus}, close other pools, or add machines with `ray start`")
        return Placement(workers, 1, 1)
    workers = cpus if workers is None else workers
    if not 1 <= workers <= cpus:
        raise fail("workers", workers, f"is more than the runtime's {cpus} free CPU core(s) (one or "
                   f"more per actor)", f"pass workers <= {cpus}, close other pools, or add machines "
                   f"with `ray start`")
    return Placement(workers, cpus // workers, 0)


@dataclass(eq=False)
class Slot:
    """Actor ``index`` of the pool: its Ray handle, the reference of its ``load`` call and,
    once loaded, where it runs."""

    index: int
    handle: object
    loaded: object
    info: ActorInfo | None = None


@dataclass(eq=False)
class Actors:
    """The pool's actors, each loading ``big`` / ``small`` with ``options`` as it starts."""

    placement: Placement
    big: object
    small: object
    options: dict
    slots: list[Slot] = field(default_factory=list)

    def start(self) -> None:
        """Start every actor and its load (returns at once; ``wait_loaded`` waits)."""
        self.slots = [self._spawn(i) for i in range(self.placement.workers)]

    def _spawn(self, index: int) -> Slot:
        ray = import_ray()
        p = self.placement
        remote = ray.remote(SessionActor).options(num_cpus=p.num_cpus, num_gpus=p.num_gpus,
                                                   max_concurrency=2)
        handle = remote.remote(p.threads)
        return Slot(index, handle, handle.load.remote(self.big, self.small, self.options))

    def loaded(self, slot: Slot) -> ActorInfo:
        """``slot``'s ``ActorInfo`` once its load finished; ``PoolWorkerError`` (one line,
        naming the actor and the cause) if it failed."""
        if slot.info is None:
            try:
                slot.info = import_ray().get(slot.loaded)
            except Exception as e:
                raise PoolWorkerError(f"actor {slot.index} of {len(self.slots)} could not load the "
                                      f"models: {describe(e)}") from None
        return slot.info

    def replace(self, slot: Slot) -> Slot:
        """A new actor in ``slot``'s place (loading at once); the old one is ended."""
        kill(slot)
        self.slots[slot.index] = self._spawn(slot.index)
        return self.slots[slot.index]

    def end(self) -> None:
        """End every actor (their Sessions and memory go with their processes)."""
        for slot in self.slots:
            kill(slot)
        self.slots = []


def kill(slot: Slot) -> None:
    try:
        import_ray().kill(slot.handle)
    except Exception:  # already dead, or the runtime is gone: nothing left to end
        pass


def describe(error: BaseException) -> str:
    """A remote error as one line: the original exception's type and the first line of its
    message (Ray wraps an actor's error with its traceback; its ``cause`` is the original)."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
