"""``SessionPool``: Sessions on Ray actors, each loaded with the same models, for work that
outgrows one GPU or machine. A job's rows are split into one contiguous share per actor
and come back in input order; the vector library stays in the notebook and vectors travel
as values. See docs/cluster.md."""
from __future__ import annotations

import inspect
from collections.abc import Sequence

from max_jupyter.errors import BadArgumentError, PoolWorkerError, SessionClosedError, UnknownNameError, did_you_mean
from max_jupyter.evaluation.degeneracy import degeneracy
from max_jupyter.evaluation.evaluate import DEFAULT_COEFS, DEFAULT_TOKENS
from max_jupyter.evaluation.result import Evaluation
from max_jupyter.jupyter.steerspec import SteerTerm, spec_mix
from max_jupyter.jupyter.sweep import Sweep, SweepRow
from max_jupyter.orchestrator.options import GenerationOptions, merge_options
from max_jupyter.orchestrator.trace import GenerationResult
from max_jupyter.pool.job import POLL_S, PoolJob, Share, run_job
from max_jupyter.pool.runtime import Actors, connect, import_ray, placement
from max_jupyter.pool.values import steering_value
from max_jupyter.session import Session, open_library
from max_jupyter.steering.concepts import is_concept, outdated
from max_jupyter.steering.vector import SteeringVector
from max_jupyter.validation import check_coef, check_int, fail

LOAD_OPTIONS = tuple(name for name in inspect.signature(Session.load).parameters
                     if name not in ("big", "small", "store", "progress"))
"""The ``Session.load`` keywords a pool passes on to every actor."""

_open_pools: set[SessionPool] = set()  # the Ray runtime a pool started ends with the last of them


class PoolResults(list):
    """A pooled ``generate_batch``: one ``GenerationResult`` per prompt, in input order,
    and ``job``, how the job went (``PoolJob``: retries, interrupted)."""

    def __init__(self, results: list[GenerationResult], job: PoolJob):
        super().__init__(results)
        self.job = job


class SessionPool:
    """Actors each holding one Session with the same models; ``start`` makes one.

    ``vectors``: the vector library (in this process); ``identity`` / ``small_identity``:
    the models every actor runs; ``actors``: where each runs (``ActorInfo``); ``last_job``:
    the ``PoolJob`` of the last job sent to the actors (also one that failed). Close it (or
    use ``with``) to end the actors."""

    def __init__(self, actors: Actors, vectors, *, owns_store: bool, owns_runtime: bool):
        self._actors, self.vectors = actors, vectors
        self._owns_store, self._owns_runtime = owns_store, owns_runtime
        info = actors.slots[0].info
        self.identity, self.small_identity = info.big, info.small
        self.last_job: PoolJob | None = None
        self._closed = False
        _open_pools.add(self)

    @classmethod
    def start(cls, workers: int | None = None, big=None, small=None, address: str | None = None, *,
              store: object = "default", progress: bool = True, **load_options) -> SessionPool:
        """Start ``workers`` actors (None: one per GPU of the Ray runtime, else one per CPU
        core; each CPU actor gets an equal share of the cores), each loading ``big`` and
        ``small`` as ``Session.load(big, small, **load_options)`` does (``backend``,
        ``max_vram_gb``, ``cache_tokens``, ``device``, ``devices``, ``dtype``). ``address``:
        None starts a local Ray runtime (or uses the one this process has joined), "auto" or
        "ray://host:port" joins a cluster (docs/cluster.md). ``store``: the vector library,
        as ``Session.load`` takes it. Returns once every actor has loaded; an actor that
        cannot load ends them all (``PoolWorkerError``, one line)."""
        if workers is not None:
            check_int("workers", workers, low=1, fix="pass None (one actor per GPU, else per core) or an int >= 1")
        for name in load_options:
            if name not in LOAD_OPTIONS:
                raise BadArgumentError(f"SessionPool.start got the unknown keyword {name!r}"
                                       f"{did_you_mean(name, LOAD_OPTIONS)}; it takes "
                                       f"{', '.join(LOAD_OPTIONS)} (as Session.load does).")
        vectors = open_library(store)
        owns_runtime, actors = False, None
        try:
            owns_runtime = connect(address)
            actors = Actors(placement(workers, _wants_gpus(load_options)), big, small, load_options)
            actors.start()
            _wait_loaded(actors, progress)
            pool = cls(actors, vectors, owns_store=vectors is not store, owns_runtime=owns_runtime)
        except BaseException:  # nothing started here may outlive the failure
            if actors is not None:
                actors.end()
            if owns_runtime and not _open_pools:
                import_ray().shutdown()
            if vectors is not store:
                getattr(vectors, "close", lambda: None)()
            raise
        return pool

    # State -----------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        return len(self._actors.slots)

    @property
    def actors(self) -> list:
        """``ActorInfo`` of each actor (None for a replacement still loading)."""
        return [slot.info for slot in self._actors.slots]

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        if self._closed:
            return "SessionPool(closed)"
        hosts = sorted({info.host for info in self.actors if info is not None})
        small = self.small_identity.describe() if self.small_identity is not None else "none"
        return (f"SessionPool({self.workers} actors on {', '.join(hosts)}, big="
                f"{self.identity.describe()}, small={small})")

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError("this pool is closed; start a new one with SessionPool.start().")

    # Jobs ------------------------------------------------------------------------------

    def generate_batch(self, prompts: Sequence, steering=None, options=None, *, progress: bool = True,
                       batch_rows: int | None = None, **changes) -> PoolResults:
        """``Session.generate_batch`` across the actors: one ``GenerationResult`` per prompt,
        in input order, as a ``PoolResults`` with ``job`` (``PoolJob``). ``steering``: one for
        every row or a list of one per row (a vector, a ``Mix``, {vector name in ``vectors``:
        coef}; None in a list: that row unsteered), None: each row's options' own;
        ``options``: one ``GenerationOptions`` or one per row, with ``changes`` applied to
        each. The rows are split into one contiguous share per actor; an actor generates its
        share as one batch, or ``batch_rows`` rows at a time (finer progress, less memory).
        Everything here is checked before any work is sent. Ctrl-C stops every actor and
        returns what finished; the rest ``finish_reason == "interrupted"`` (partial text, or
        none for rows not started)."""
        self._check_open()
        prompts = _rows("prompts", prompts)
        n = len(prompts)
        if batch_rows is not None:
            check_int("batch_rows", batch_rows, low=1, fix="pass None (a share is one batch) or an int >= 1")
        per_row = options if isinstance(options, (list, tuple)) else [options] * n
        if len(per_row) != n:
            raise fail("options", f"a list of {len(per_row)}", f"does not match the {n} prompts",
                       "give one GenerationOptions for all rows, or one per prompt")
        per_row = [merge_options(o, GenerationOptions(), changes) for o in per_row]
        given = steering if isinstance(steering, (list, tuple)) else [steering] * n
        if len(given) != n:
            raise fail("steering", f"a list of {len(given)}", f"does not match the {n} prompts",
                       "give one steering per prompt, or one for all")
        listed = isinstance(steering, (list, tuple))  # a None in a list is an unsteered row, as in Session
        values = [steering_value(o.steering if steering is None else s, self.vectors, self.identity,
                                 f"steering[{i}]" if listed else "steering")
                  for i, (s, o) in enumerate(zip(given, per_row))]
        per_row = [o.replace(steering=None) for o in per_row]  # each row's steering travels in values
        shares = [Share(rows, "generate_batch", (prompts[rows.start:rows.stop], values[rows.start:rows.stop],
                                                 per_row[rows.start:rows.stop], batch_rows or len(rows)))
                  for rows in split(n, self.workers)]
        results, job = self._run(shares, f"generate_batch on {self.workers} actors", progress)
        merged = []
        for share, value in zip(shares, results):
            merged += value if value is not None else [
                GenerationResult([], finish_reason="interrupted") for _ in share.rows]
        return PoolResults(merged, job)

    def sweep(self, prompt: str, term: SteerTerm | str, coefs: Sequence[float], options=None, *,
              progress: bool = True, **changes) -> Sweep:
        """``run_sweep`` across the actors: ``prompt`` once per coefficient with ``coef *
        term`` (a ``SteerTerm`` or a vector name of ``vectors``; its vector travels as a
        value), each row scored by its actor's unsteered model (perplexity) and by its
        degeneracy. The coefficients are split into one share per actor; the ``Sweep``'s rows
        come back in coefficient order, with ``sweep.job`` (``PoolJob``). Checked here first:
        the vector, its model and layers, every coefficient. Ctrl-C stops every actor: rows
        it stopped are marked interrupted (a share that sent nothing back: empty rows)."""
        self._check_open()
        term = SteerTerm(term, 1.0) if isinstance(term, str) else term
        if not isinstance(term, SteerTerm):
            raise fail("term", term, f"is a {type(term).__name__}", "give a vector name or a SteerTerm")
        coefs = _rows("coefs", coefs)
        for coef in coefs:  # the vector (name, model, layers) and every coefficient
            spec_mix([SteerTerm(term.name, coef, term.layers)], self.vectors, self.identity)
        vector = self.vectors[term.name]
        options = merge_options(options, GenerationOptions(), changes)
        shares = [Share(rows, "sweep", (prompt, term, vector, coefs[rows.start:rows.stop], options))
                  for rows in split(len(coefs), self.workers)]
        parts, job = self._run(shares, f"sweep on {self.workers} actors", progress)
        sweep = Sweep(next((part.spec for part in parts if part is not None), term.name), prompt)
        for share, part in zip(shares, parts):
            sweep.rows += part.rows if part is not None else [
                SweepRow(coefs[i], GenerationResult([], finish_reason="interrupted"), degeneracy([]))
                for i in share.rows]
        sweep.job = job
        return sweep

    def evaluate(self, vector: SteeringVector | str, *, concept: str | None = None,
                 prompts: Sequence[str] | None = None, coefs: Sequence[float] | None = None,
                 max_new_tokens: int = DEFAULT_TOKENS, options: GenerationOptions | None = None,
                 seed: int = 0, progress: bool = True) -> Evaluation:
        """``Session.evaluate`` across the actors, with the same arguments and the same
        ``Evaluation``: the coefficients are split into one share per actor, each actor
        evaluates its share (with the baselines, which every actor runs: a pool's speed-up
        is in the coefficients), and the rows are put together as one evaluation would have
        them — every coefficient's rows, one actor's baselines, and the controls of the
        actor whose share held the coefficient chosen over all of them (which is that
        share's own choice). ``vector``: a vector (sent as a value), a name of ``vectors``
        (its vector sent under that name) or a library concept (each actor trains it on
        first use, as a Session does; also where ``vectors`` holds it from an earlier
        recipe, ``steering.concepts.outdated``). ``evaluation.job``: the ``PoolJob``; ``generation_s``
        and ``scoring_s`` add up the actors' times."""
        self._check_open()
        if isinstance(vector, str) and vector not in self.vectors and not is_concept(vector):
            raise UnknownNameError(f"vector={vector!r} is neither in the pool's library nor a library "
                                   f"concept; the library has {sorted(self.vectors) or 'none'} (pool.vectors).")
        sent = vector
        if isinstance(vector, str):  # an outdated concept vector is not sent: each actor trains the concept
            sent = None if is_concept(vector) and outdated(self.vectors, vector, vector) else self.vectors.get(vector)
        value = steering_value(sent, self.vectors, self.identity, "vector")
        if value is not None and not isinstance(value, SteeringVector):
            raise fail("vector", vector, f"is a {type(vector).__name__}", "give a SteeringVector, a name "
                       "of pool.vectors or a library concept's name")
        coefs = _rows("coefs", DEFAULT_COEFS if coefs is None else coefs)
        coefs = [check_coef(f"coefs[{i}]", c) for i, c in enumerate(coefs)]
        name = vector if isinstance(vector, str) else None
        args = dict(concept=concept, prompts=prompts, max_new_tokens=max_new_tokens, options=options, seed=seed)
        shares = [Share(rows, "evaluate", (name, value, coefs[rows.start:rows.stop], args))
                  for rows in split(len(coefs), self.workers)]
        parts, job = self._run(shares, f"evaluate on {self.workers} actors", progress)
        return merge_evaluations(parts, coefs, job)

    def _run(self, shares: list[Share], desc: str, progress: bool) -> tuple[list, PoolJob]:
        _check_travels(shares)
        job = self.last_job = PoolJob(self.workers, sum(len(share.rows) for share in shares))
        return run_job(self._actors, shares, job, desc, progress), job

    # Closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """End every actor (their Sessions and memory go with them), leave the Ray runtime
        if this pool started it and no other pool uses it, close the vector library if
        ``start`` opened it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _open_pools.discard(self)
        try:
            self._actors.end()
            if self._owns_runtime and not _open_pools:
                import_ray().shutdown()
        finally:
            if self._owns_store:
                getattr(self.vectors, "close", lambda: None)()

    def __enter__(self) -> SessionPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def split(rows: int, parts: int) -> list[range]:
    """``rows`` positions in at most ``parts`` contiguous ranges whose sizes differ by at most
    one, the larger first."""
    parts = min(parts, rows)
    base, extra = divmod(rows, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _rows(name: str, rows: object) -> list:
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise fail(name, rows, "is not a non-empty list", f"give a list of {name}, e.g. ['Hi', 'Hello']")
    return list(rows)


def _wants_gpus(load_options: dict) -> bool:
    """Whether the models may go on GPUs (no ``device`` / ``devices`` pins them to the CPU)."""
    pinned = [load_options.get("device"), *(load_options.get("devices") or ())]
    return not any(str(d).startswith("cpu") for d in pinned if d is not None)


def _wait_loaded(actors: Actors, progress: bool) -> None:
    """Wait for every actor's load, with a bar; the first that fails raises (one line)."""
    from tqdm.auto import tqdm

    ray = import_ray()
    waiting = {slot.loaded: slot for slot in actors.slots}
    with tqdm(total=len(waiting), desc="starting pool", unit="actor", disable=not progress) as bar:
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=POLL_S)
            for ref in ready:
                actors.loaded(waiting.pop(ref))
                bar.update()
    first = actors.slots[0].info
    for slot in actors.slots[1:]:
        if (slot.info.big, slot.info.small) != (first.big, first.small):
            raise PoolWorkerError(f"actor {slot.index} on {slot.info.host} loaded "
                                  f"{slot.info.big.describe()}, actor 0 on {first.host} "
                                  f"{first.big.describe()}; give every machine the same model files.")


def _check_travels(shares: list[Share]) -> None:
    """Every share's arguments can be sent (pickled) — checked before the first is sent."""
    from ray import cloudpickle

    for share in shares:
        try:
            cloudpickle.dumps(share.args)
        except Exception as e:
            raise BadArgumentError(f"the arguments of rows {share.rows.start}..{share.rows.stop - 1} "
                                   f"cannot be sent to the actors ({type(e).__name__}: {e}); pass "
                                   f"values (vectors, GenerationOptions, str prompts).") from None


def merge_evaluations(parts: list, coefs: list[float], job: PoolJob) -> Evaluation:
    """One ``Evaluation`` of ``coefs`` from the shares' (None: a share Ctrl-C stopped before
    it answered), with the rows one evaluation of all of them would hold, in its order."""
    done = [part for part in parts if part is not None]
    if not done:
        raise PoolWorkerError("the evaluation was stopped before any actor finished a condition; "
                              "run it again.")
    first = done[0]
    merged = Evaluation(first.concept, first.vector, first.prompts, coefs, first.probe_auroc,
                        first.fluency_scale, first.reader)
    merged.rows = [row for part in done for row in part.select("steered")]
    merged.rows += first.select("none") + first.select("prompting")
    chosen = merged.chosen_coef
    for part in done:
        if chosen is not None and part.chosen_coef == chosen:  # the share that held it chose it too
            merged.rows += part.select("random", chosen) + part.select("flipped", -chosen)
            break
    merged.interrupted = job.interrupted or len(done) < len(parts) or any(p.interrupted for p in done)
    merged.generation_s = sum(p.generation_s for p in done)
    merged.scoring_s = sum(p.scoring_s for p in done)
    merged.elapsed_s = job.elapsed_s
    merged.job = job
    return merged
