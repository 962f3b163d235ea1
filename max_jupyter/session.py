"""``Session``: the kernel-resident runtime that notebooks, widgets and the server share.

It owns the engines and one worker thread, the only thread that touches them; the live
mix, the named mixes, the vector library, the judges, the defaults and the last result.
See docs/design.md ("The Session", "Threading model").
"""
from __future__ import annotations

import gc
import itertools
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from concurrent import futures

from max_jupyter.engines.base import Engine
from max_jupyter.errors import BadArgumentError, ContextOverflowError, SessionClosedError, UnknownNameError
from max_jupyter.evaluation.evaluate import DEFAULT_TOKENS, evaluate
from max_jupyter.evaluation.result import Evaluation
from max_jupyter.handle import CallJob, GenerationHandle
from max_jupyter.loading import Source, check_sources, load_models
from max_jupyter.orchestrator.cognitive import CognitiveOrchestrator, PreparedRun, check_judges_fit
from max_jupyter.orchestrator.gates import CompiledSteering, compile_steering
from max_jupyter.orchestrator.judges import Judge
from max_jupyter.orchestrator.mirror import ContextMirror, shares_vocabulary
from max_jupyter.orchestrator.options import CallSteering, GenerationOptions, merge_options
from max_jupyter.orchestrator.speculative import Pace
from max_jupyter.orchestrator.trace import GenerationResult, StepEvent
from max_jupyter.orchestrator.types import Prompt, as_mix, run_to_end
from max_jupyter.steering.concepts import CONCEPT_METHOD, CONCEPT_READ, concept, concept_layers, is_concept, outdated
from max_jupyter.steering.concepts import library as concept_library
from max_jupyter.steering.expression import Expression, render
from max_jupyter.steering.mix import Mix
from max_jupyter.steering.probe import ConceptProbe, fit_probe
from max_jupyter.steering.vector import SteeringVector
from max_jupyter.validation import check_layers, check_vector_name, fail
from max_jupyter.worker import Worker

_ids = itertools.count(1)


class Session:
    """Two engines (``small`` may be None) behind one worker thread; see the module.

    Build one with ``Session.load(...)``. ``mix`` (the live mix) applies at every step of
    every generation and may change from any thread at any time; ``mixes`` are named mixes
    that judges turn on; ``vectors`` is the library of named vectors; ``judges`` (name ->
    Judge) run on every generation unless a call names others (``add_judge`` adds one with
    the mixes it turns on, ``remove_judge`` takes both away); ``defaults`` is the
    ``GenerationOptions`` a generation starts from.
    """

    def __init__(self, big: Engine, small: Engine | None = None, *,
                 vectors: MutableMapping[str, SteeringVector] | None = None, plan: object = None):
        if small is not None:
            ContextMirror(big, small)  # a small model that cannot mirror is refused now
        self._big, self._small, self.plan = big, small, plan
        self.mix = Mix(big.identity)
        self.mixes: dict[str, Mix] = {}
        self.vectors: MutableMapping[str, SteeringVector] = {} if vectors is None else vectors
        self.judges: dict[str, Judge] = {}
        self._judge_mixes: set[str] = set()  # the mixes add_judge added, while a judge uses them
        self._gates: list[str] = []  # the judges of the gates of the expression steer() set
        self._defaults = GenerationOptions()
        self.last: GenerationResult | None = None
        self._started: GenerationHandle | None = None  # the last generation started
        self._worker = Worker(f"max_jupyter-session-{next(_ids)}")
        self._closed = False
        self._owns_store = False  # Session.load opened the library: close() closes it
        self._probes: dict[tuple, ConceptProbe] = {}  # (concept, reader identity) -> probe
        self._pace = Pace()  # speculation's pace on this pair, kept across generations

    @property
    def defaults(self) -> GenerationOptions:
        """The options a generation starts from (``start`` / ``generate`` keywords change
        them for one call); set a new one with ``s.defaults = s.defaults.replace(...)``."""
        return self._defaults

    @defaults.setter
    def defaults(self, options: GenerationOptions) -> None:
        self._defaults = merge_options(options, self._defaults, {})  # checks its type

    @property
    def handle(self) -> GenerationHandle | None:
        """The generation running now (from the notebook or the server), else the last one
        started (queued or finished); None before any."""
        running = self._worker.running
        return running if isinstance(running, GenerationHandle) else self._started

    @classmethod
    def load(cls, big: Source = None, small: Source = None, *, backend: str = "auto",
             max_vram_gb: float | None = None, cache_tokens: int | None = None,
             device: str | None = None, devices: tuple | None = None, dtype=None,
             store: object = "default", progress: bool = True) -> Session:
        """Load ``big`` (None: the embedded SmolLM2-135M-Instruct) and ``small`` (None: no
        small model; ``"same"``: the big source again; or another source).

        ``backend``: auto (ExLlamaV3 for EXL3 folders, ExLlamaV2 for EXL2/GPTQ folders, where
        CUDA and that library are present, else transformers), transformers, exllamav2 or
        exllamav3. ``max_vram_gb`` and ``cache_tokens`` feed the GPU backends' memory plan
        (``session.plan``); ``cache_tokens`` caps the context on transformers too.
        ``device``: where both models go (None: CUDA where present, else the CPU);
        ``devices``: ``(big's, small's)`` instead, e.g. ``("cuda:0", "cuda:1")``
        (transformers backend). ``dtype``: the weights' dtype on the transformers backend
        (float32, bfloat16, float16, or "int8": int8 linear layers on the CPU, about 4 times
        fewer bytes a step, each product within about 1-2% of fp32's), one for both models or a
        pair (big's, small's), e.g. ``(None, "int8")`` for a cheap small model on a CPU (None:
        fp16 on CUDA, fp32 on the CPU; but ``small="qwen2.5-coder-0.5b"`` on the CPU: int8,
        ``pair.SMALL_CPU_DTYPE``; pass ``(None, "float32")`` for its exact weights).
        ``store``: the vector library — "default" (the VectorStore at its default path, so
        vectors survive the kernel), None (a dict in memory), a path, or a ``VectorStore``.
        """
        check_sources(big, small, backend)
        vectors = open_library(store)
        engines: tuple = ()
        try:
            *engines, plan = load_models(
                big, small, backend=backend, max_vram_gb=max_vram_gb, cache_tokens=cache_tokens,
                device=device, devices=devices, dtype=dtype, progress=progress)
            session = cls(*engines, vectors=vectors, plan=plan)
        except BaseException:  # nothing loaded here may outlive the failure (VRAM, the file)
            for engine in engines:
                getattr(engine, "unload", lambda: None)()
            if vectors is not store:
                getattr(vectors, "close", lambda: None)()
            raise
        session._owns_store = vectors is not store
        return session

    # State -----------------------------------------------------------------------------

    @property
    def big(self) -> Engine:
        self._check_open()
        return self._big

    @property
    def small(self) -> Engine | None:
        self._check_open()
        return self._small

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        """A generation or another job is running or queued."""
        return self._worker.busy

    def __repr__(self) -> str:
        if self._closed:
            return "Session(closed)"
        small = self._small.identity.describe() if self._small is not None else "none"
        return (f"Session(big={self._big.identity.describe()}, small={small}, "
                f"{len(self.vectors)} vectors, mix={self.mix!r})")

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError("this session is closed; load a new one with Session.load().")

    # Generation ------------------------------------------------------------------------

    def start(self, prompt: Prompt, options: GenerationOptions | None = None, *,
              on_event: Callable[[StepEvent], None] | None = None, wait: bool = True,
              **changes) -> GenerationHandle:
        """Queue a generation on the worker and return its handle at once. ``options``
        (default ``self.defaults``) with ``changes`` (option names, or ``temperature`` /
        ``top_k`` / ``top_p`` / ``seed``): see ``GenerationOptions``. ``on_event`` is called
        on the worker with each ``StepEvent``; ``wait=False`` raises ``BusyError`` at once
        if another job is running or queued. Everything is checked here, before anything is
        queued."""
        self._check_open()
        options = merge_options(options, self._defaults, changes)
        orchestrator, prepared = self._prepare(prompt, options)
        probes = [self.probe(name) for name in options.probes]  # fitted (on the worker) now
        handle = GenerationHandle(lambda h: self._generate_on_worker(orchestrator, prepared, probes),
                                  prepared.result.prompt_ids, on_event)
        prepared.on_event, prepared.abort = handle.push, handle.abort
        self._worker.submit(handle, wait=wait)
        self._started = handle
        return handle

    def generate(self, prompt: Prompt, options: GenerationOptions | None = None, *,
                 on_text: Callable[[str], None] | None = None,
                 on_event: Callable[[StepEvent], None] | None = None, wait: bool = True,
                 **changes) -> GenerationResult:
        """``start`` and wait for the result in this thread. Ctrl-C while waiting stops the
        generation within one step and returns the partial result (``finish_reason ==
        "interrupted"``). ``on_text`` (if given) gets each text piece on this thread."""
        handle = self.start(prompt, options, on_event=on_event, wait=wait, **changes)
        try:
            for event in handle.events():
                if on_text is not None and event.text:
                    on_text(event.text)
            return handle.result()
        except KeyboardInterrupt:
            handle.stop("interrupted")
            return handle.result()
        except BaseException:  # on_text failed: the generation must not run on unwatched
            handle.stop("error")
            raise

    def generate_batch(self, prompts: Sequence[Prompt],
                       steering: CallSteering | Sequence[CallSteering] = None,
                       options: GenerationOptions | Sequence[GenerationOptions] | None = None, *,
                       progress: bool = True, **changes) -> list[GenerationResult]:
        """Generate every prompt of ``prompts`` together as one batch on the worker; one
        ``GenerationResult`` (with its trace) per prompt, in order.

        ``steering``: one call steering for every row, or a list with one per row (each a
        mix, a vector or {vector name: coefficient}, or None), on top of the live mix;
        None: the options' own. ``options`` (default ``self.defaults``): one
        ``GenerationOptions`` for all rows or a list with one per row (its own seed,
        temperature, length, stop strings...), with ``changes`` applied to each. A row
        gives the tokens of the same ``generate`` call alone (greedy: token for token;
        sampled: with its seed), within the backend's arithmetic. No small model and no
        judges run in a batch: ``judges=`` naming any, ``speculate`` and ``small_layers``
        are refused, the session's judges are not run and ``mirror`` is ignored.
        Everything is checked before any forward pass: the prompts (not empty), the list
        lengths, each row's room in the context and the batch's memory. ``progress``: a
        tqdm bar of the tokens. Ctrl-C ends the batch before its next step and returns
        the results: finished rows whole, the others with ``finish_reason ==
        "interrupted"`` and their partial text."""
        from tqdm.auto import tqdm

        from max_jupyter.orchestrator.batched import generate_batch

        self._check_open()
        rows = self._batch_rows(prompts, steering, options, changes)
        done = [0]
        bar = tqdm(total=sum(run.max_new_tokens for _, run in rows), desc=f"batch of {len(rows)}",
                   unit="tok", disable=not progress, leave=False)

        def count(n: int) -> None:
            done[0] += n

        job = CallJob(lambda job: generate_batch(self._big, rows, job.cancelled, count))
        try:
            return self._wait(job, True, lambda: bar.update(done[0] - bar.n), keep_on_interrupt=True)
        finally:
            bar.close()

    def _batch_rows(self, prompts, steering, options, changes) -> list[tuple[CognitiveOrchestrator, PreparedRun]]:
        """``generate_batch``'s rows, each checked and prepared (no forward pass)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise fail("prompts", prompts, f"is a {type(prompts).__name__}, not a list of prompts",
                       "pass a list of prompts (one str is generate()'s)")
        if not prompts:
            raise fail("prompts", prompts, "is empty", "give at least one prompt")
        n = len(prompts)
        per_row = [options] * n if options is None or isinstance(options, GenerationOptions) else options
        if not isinstance(per_row, Sequence) or len(per_row) != n:
            raise fail("options", options, f"is not one GenerationOptions or a list of {n}",
                       f"give one GenerationOptions, or one per prompt ({n})")
        row_steering = steering if isinstance(steering, (list, tuple)) else [steering] * n
        if len(row_steering) != n:
            raise fail("steering", steering, f"holds {len(row_steering)} entries for {n} prompts",
                       f"give one steering for all rows, or a list of {n} (None for an unsteered row)")
        rows = []
        for i, (prompt, row_options, row_steer) in enumerate(zip(prompts, per_row, row_steering)):
            o = merge_options(row_options, self._defaults, changes)
            if steering is not None:
                o = o.replace(steering=row_steer)
            if o.judges or o.speculate or o.trace.small_layers:
                raise BadArgumentError(f"options of prompts[{i}]: a batch runs no small model and no "
                                       f"judges; leave out judges=, speculate= and small_layers (or "
                                       f"use generate() for this prompt).")
            if o.probes:
                raise BadArgumentError(f"options of prompts[{i}]: probes= reads a generation of "
                                       f"generate() or start(); leave it out of a batch.")
            orchestrator = CognitiveOrchestrator(self._big, steering=[self.mix, self._row_steering(o.steering, i)])
            try:
                rows.append((orchestrator, orchestrator.prepare(prompt, o)))
            except (BadArgumentError, ContextOverflowError) as e:
                raise type(e)(f"prompts[{i}]: {e}") from None
        if self._big.supports_batch:
            self._big.check_batch([len(run.result.prompt_ids) + run.max_new_tokens for _, run in rows])
        return rows

    def _generate_on_worker(self, orchestrator: CognitiveOrchestrator, prepared: PreparedRun,
                            probes: Sequence[ConceptProbe] = ()) -> GenerationResult:
        result = run_to_end(orchestrator.run(prepared))
        if probes and result.token_ids:
            reader = self.reader
            result.probe_scores = {p.concept: p.read(reader, result.prompt_ids, result.token_ids)
                                   for p in probes}
        self.last = result
        return result

    def _prepare(self, prompt: Prompt, options: GenerationOptions
                 ) -> tuple[CognitiveOrchestrator, PreparedRun]:
        """The orchestrator and the checked, prepared run of one generation."""
        judges = self._judges(options.judges)
        small = self._small if (options.mirror or any(j.needs_small or j.small_model for j in judges)) \
            else None
        steering, mixes = self._call_steering(options.steering), self.mixes
        if isinstance(steering, CompiledSteering):  # its gates judge this call too
            judges, mixes = [*judges, *steering.judges], {**mixes, **steering.mixes}
            small = small or (self._small if steering.judges else None)
            steering = steering.mix
        orchestrator = CognitiveOrchestrator(self._big, small, judges, mixes=mixes,
                                             steering=[self.mix, steering], pace=self._pace)
        return orchestrator, orchestrator.prepare(prompt, options)

    def _judges(self, judges: tuple[str | Judge, ...] | None) -> list[Judge]:
        """The judges of one call: the session's (None), or names in it and Judge objects."""
        if judges is None:
            return list(self.judges.values())
        chosen = []
        for judge in judges:
            if isinstance(judge, str):
                if judge not in self.judges:
                    raise BadArgumentError(f"judges: no judge named {judge!r}; the session has "
                                           f"{sorted(self.judges) or 'none'} (add one with "
                                           f"session.add_judge).")
                judge = self.judges[judge]
            chosen.append(judge)
        return chosen

    def _row_steering(self, steering: CallSteering, i: int) -> Mix | SteeringVector | None:
        """A batch row's own steering: additions only (a batch adds per row; ablations,
        clamps and gates need ``generate``), refused before anything runs."""
        steering = self._call_steering(steering)
        if isinstance(steering, CompiledSteering):
            if steering.judges:
                raise BadArgumentError(f"steering of prompts[{i}]: a batch runs no judges, so no "
                                       f"gate (@when); use generate() for this prompt.")
            steering = steering.mix
        for mix in (self.mix, steering):
            if isinstance(mix, Mix) and any(e.op != "add" for e in mix.entries.values()):
                raise BadArgumentError(f"steering of prompts[{i}]: a batch only adds; an ablation or "
                                       f"clamp (!name, name[lo,hi]) needs generate().")
        return steering

    def _call_steering(self, steering: CallSteering) -> Mix | SteeringVector | CompiledSteering | None:
        """A call's own steering (checked by ``GenerationOptions``) as a mix or vector: a
        {vector name: coefficient} mapping becomes a mix of the library's vectors, an
        expression its compiled mixes and gate judges."""
        if steering is None or isinstance(steering, (Mix, SteeringVector)):
            return steering
        if isinstance(steering, Expression):
            return self.compile(steering)
        mix = Mix(self._big.identity)
        for name, coef in steering.items():
            mix.set(name, self.vector(name), coef)
        return mix

    # Steering expressions ----------------------------------------------------------------

    def compile(self, expression: str | Expression, what: str = "steering") -> CompiledSteering:
        """``expression`` (docs/steering.md) resolved against the library for the big model:
        its ungated clauses as one mix, each gate as a named mix and its judge. Measures the
        means an ``=mean`` ablation needs (``means``). ``BadArgumentError`` with the column."""
        small = self._small.identity if self._small is not None else None
        return compile_steering(expression, self.vectors_and_concepts, self._big.identity, small,
                                self.means, what)

    def steer(self, expression: str | Expression | None, what: str = "steering") -> CompiledSteering | None:
        """Make ``expression`` the live mix (all of it at once) and its gates the session's
        judges (replacing the gates of the expression steered before); checked first, so a
        refused expression changes nothing. None or blank text: an empty live mix, no gates."""
        blank = expression is None or isinstance(expression, str) and not expression.strip()
        compiled = None if blank else self.compile(expression, what)
        for name in self._gates:
            self.remove_judge(name)
        self._gates = []
        if compiled is None:
            self.mix.clear()
            return None
        for judge in compiled.judges:
            mix_name = judge.turns_on[0]
            self.add_judge(judge.name, judge, {mix_name: compiled.mixes[mix_name]})
            self._gates.append(judge.name)
        self.mix.assign(compiled.mix.entries)
        return compiled

    def expression(self) -> str:
        """The live mix and its gates (``steer``) written as one expression (``""``: none)."""
        clauses = [render(self.mix.entries)] if len(self.mix) else []
        for name in self._gates:
            judge = self.judges[name]
            clauses.append(f"{render(self.mixes[judge.turns_on[0]].entries)} {name.split('#')[0]}")
        return "; ".join(clauses)

    def means(self, name: str, vector: SteeringVector) -> dict[int, float]:
        """The ablation means of the library's vector ``name`` (``steering.means``): known
        in this process, else stored with it, else measured once on the worker (after the
        jobs before it) and stored with it where the library is a ``VectorStore``."""
        from max_jupyter.steering.means import known_means, measure_means, remember

        got = known_means(vector)
        if got is not None:
            return got
        store = self.vectors if callable(getattr(self.vectors, "save_means", None)) else None
        stored = store.means(name) if store is not None and name in store else None
        if stored is not None and set(stored) >= set(vector.layers):
            return remember(vector, stored)
        means = self.run(lambda s: measure_means(s.big, vector))
        if store is not None and name in store and store[name].checksum() == vector.checksum():
            store.save_means(name, means)
        return means

    # Judges and the mixes they turn on --------------------------------------------------

    def add_judge(self, name: str, judge: Judge,
                  mixes: Mapping[str, Mix | SteeringVector] | None = None) -> None:
        """Register ``judge`` under ``name`` (replacing a judge of that name) with the named
        mixes it turns on: ``mixes`` (name -> Mix, or a vector at coefficient 1) go into
        ``self.mixes`` (replacing mixes of those names); ``remove_judge`` takes them away
        again. Checked first with the orchestrator's rules (``check_judges_fit``: the small
        model, its vocabulary, the layers, the mixes it turns on): a refused judge changes
        nothing."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise fail("name", name, "is not a non-empty str", "name the judge, e.g. 'calm'")
        if not isinstance(judge, Judge):
            raise fail("judge", judge, f"is a {type(judge).__name__}, not a Judge",
                       "build one, e.g. ProbeJudge(vector, threshold=2.0, mix='calm')")
        added = self._checked_mixes(mixes)
        if any(j.name == judge.name for n, j in self.judges.items() if n != name):
            raise BadArgumentError(f"another judge is already named {judge.name!r}; give this one "
                                   f"another name= (judge names must be unique).")
        check_judges_fit(self._big, self._small, [judge], {**self.mixes, **added})
        self.judges.pop(name, None)
        self.mixes.update(added)
        self.judges[name] = judge
        self._judge_mixes |= set(added)
        self._drop_unused()  # a replaced judge's mixes that no judge turns on now

    def remove_judge(self, name: str) -> list[str]:
        """Remove the judge ``name`` and the mixes ``add_judge`` added that no judge turns
        on any more (kept while another judge does); returns the names of those removed."""
        if name not in self.judges:
            raise UnknownNameError(f"no judge named {name!r}; the session has "
                                   f"{sorted(self.judges) or 'none'}.")
        del self.judges[name]
        return self._drop_unused()

    def _checked_mixes(self, mixes: Mapping[str, Mix | SteeringVector] | None) -> dict[str, Mix]:
        """``mixes`` as named Mixes, each checked to be for the big model."""
        if mixes is None:
            return {}
        if not isinstance(mixes, Mapping):
            raise fail("mixes", mixes, f"is a {type(mixes).__name__}, not a mapping",
                       "give {mix name: Mix or SteeringVector}")
        checked = {}
        for mix_name, mix in mixes.items():
            if not isinstance(mix_name, str) or not mix_name:
                raise fail("mixes", mixes, f"has the key {mix_name!r}", "name each mix by a non-empty str")
            if not isinstance(mix, (Mix, SteeringVector)):
                raise fail(f"mixes[{mix_name!r}]", mix, f"is a {type(mix).__name__}",
                           "give a Mix or a SteeringVector")
            mix = as_mix(mix)
            mix.snapshot(self._big)  # raises ModelMismatchError for a mix of another model
            checked[mix_name] = mix
        return checked

    def _drop_unused(self) -> list[str]:
        """Remove the mixes ``add_judge`` added that no judge turns on; their names."""
        used = {m for judge in self.judges.values() for m in judge.turns_on}
        dropped = sorted(self._judge_mixes - used)
        for mix_name in dropped:
            self.mixes.pop(mix_name, None)
        self._judge_mixes -= set(dropped)
        return dropped

    def vector(self, name: str, *, progress: bool = True) -> SteeringVector:
        """The vector ``name`` from the library; the name of a library concept
        (``steering.concepts``) that the library has no vector of for the big model (or only
        one from an earlier recipe) is trained on first use (on the worker, from the
        concept's pairs read as replies at its layers; ``progress``: its bar) and kept in
        the library (a VectorStore tags it ``concept``; where the name holds another
        model's vector it goes under ``name.<fingerprint>``). A clear error for any other
        name."""
        self._check_open()
        if isinstance(name, str) and name in self.vectors and not is_concept(name):
            return self.vectors[name]
        if is_concept(name):
            return self._concept_vector(name, progress)
        raise BadArgumentError(f"no vector named {name!r} in the library; it has "
                               f"{sorted(self.vectors) or 'none'} and the concepts "
                               f"{', '.join(concept_library())} (train, load or import one).")

    @property
    def vectors_and_concepts(self) -> Mapping[str, SteeringVector]:
        """The library with the concepts added: a read-only mapping whose lookup is
        ``vector(name)`` (a concept's vector trained on first use), for whatever resolves
        steering names (``--steer``, expressions)."""
        return _VectorsAndConcepts(self)

    def concept_vector_name(self, name: str) -> tuple[str, bool]:
        """The library name that holds (or will hold) concept ``name``'s vector for the big
        model — ``name``, or ``name.<fingerprint>`` where ``name`` holds another model's —
        and whether the library has it now. A concept vector that a VectorStore keeps from
        an earlier recipe (``steering.concepts.outdated``) counts as not there: first use
        trains it again, as a new version under the same name."""
        identity = self._big.identity
        for key in (name, f"{name}.{identity.fingerprint[:8]}"):
            if key not in self.vectors:
                return key, False
            if self.vectors[key].model == identity:
                return key, not outdated(self.vectors, key, name)
        return key, False

    def _concept_vector(self, name: str, progress: bool) -> SteeringVector:
        key, trained = self.concept_vector_name(name)
        if trained:
            return self.vectors[key]
        found = concept(name)
        fields = {"tags": ("concept",), "notes": found.description} if hasattr(self.vectors, "save") else {}
        return self.train(key, found.positive, found.negative, method=CONCEPT_METHOD, read=CONCEPT_READ,
                          layers=concept_layers(self._big.identity.num_layers), progress=progress, **fields)

    @property
    def reader(self) -> Engine:
        """The engine that reads texts for probes and scores: the small model where one is
        loaded and shares the big one's vocabulary (so the model that wrote a text is not
        the one that judges it), else the big model, unsteered."""
        small = self.small
        return small if small is not None and shares_vocabulary(self._big, small) else self._big

    def probe(self, name: str) -> ConceptProbe:
        """The probe of concept ``name`` on ``reader``, fitted on the worker from the
        concept's scoring texts on first use and kept for this session."""
        found = concept(name)
        reader = self.reader
        key = (name, reader.identity)
        if key not in self._probes:
            self._probes[key] = self.run(lambda s: fit_probe(
                reader, name, found.scoring_positive, found.scoring_negative))
        return self._probes[key]

    def evaluate(self, vector: SteeringVector | str, *, concept: str | None = None,
                 prompts: Sequence[str] | None = None, coefs: Sequence[float] | None = None,
                 max_new_tokens: int = DEFAULT_TOKENS, options: GenerationOptions | None = None,
                 seed: int = 0, progress: bool = True) -> Evaluation:
        """Evaluate ``vector`` (a vector, a library concept's or vector's name) for a concept
        (default: its own name) over held-out prompts at each coefficient, with the
        baselines (no steering, prompting, a random vector of its norms, it negated), as
        batches, scored by ``reader``: an ``Evaluation`` (``evaluation.evaluate``; docs/evaluation.md).
        Ctrl-C returns what is finished."""
        self._check_open()
        return evaluate(self, vector, concept_name=concept, prompts=prompts, coefs=coefs,
                        max_new_tokens=max_new_tokens, options=options, seed=seed, progress=progress)

    # Other work on the worker ----------------------------------------------------------

    def run(self, fn: Callable[[Session], object], *, wait: bool = True) -> object:
        """Run ``fn(self)`` on the worker (the only thread that touches the engines), after
        the jobs before it, and return its value; ``wait=False`` raises ``BusyError`` if
        the worker is busy. Ctrl-C while waiting raises once ``fn`` has ended."""
        self._check_open()
        job = CallJob(lambda _job: fn(self))
        return self._wait(job, wait)

    def interrupt(self) -> None:
        """End the job running on the worker now as Ctrl-C in the cell waiting for it would,
        from any thread: a generation within one step (``"interrupted"``), a batch before its
        next step (finished rows kept), a training after its current example. Queued jobs
        are not touched; a no-op when nothing runs."""
        running = self._worker.running
        if isinstance(running, GenerationHandle):
            running.stop("interrupted")
        elif running is not None:
            running.stop()

    def train(self, name: str, positive: Sequence[str], negative: Sequence[str], *,
              layers: Iterable[int] | None = None, method: str = "svd_diff",
              read: str = "last_token", save: bool = True, progress: bool = True,
              **store_fields) -> SteeringVector:
        """Train a vector for the big model from pairs (``steering.train_vector``; ``read``:
        ``"last_token"`` or ``"reply"``, where the states are read) on the worker, with a
        progress bar; unless ``save`` is False, put it in ``vectors`` under ``name`` (a
        VectorStore also keeps the method with ``read``, the pairs and ``store_fields``).
        Every argument is checked before any forward pass. Ctrl-C stops it after the
        current example."""
        from tqdm.auto import tqdm

        from max_jupyter.steering.training import stored_method, train_vector

        self._check_open()
        method = self._check_training(name, positive, negative, layers, method, read, save, store_fields)
        bar = None  # opened at the first example read, so bad input leaves no 0% bar behind
        done, total = [0], [0]

        def show() -> None:
            nonlocal bar
            if done[0] and bar is None:
                bar = tqdm(total=total[0], desc=f"training {name}", unit="text",
                           disable=not progress)
            if bar is not None:
                bar.update(done[0] - bar.n)

        def work(job: CallJob) -> SteeringVector:
            def tick(n: int, texts: int) -> None:
                total[0], done[0] = texts, n  # the total first: ``show`` opens the bar on done
                if job.cancelled.is_set():
                    raise KeyboardInterrupt
            return train_vector(self._big, positive, negative, layers=layers, method=method,
                                read=read, label=name, progress=tick)

        try:
            vector = self._wait(CallJob(work), True, show)
        finally:
            if bar is not None:
                bar.close()
        if save:
            self._store(name, vector, stored_method(method, read), positive, negative, store_fields)
        return vector

    def _check_training(self, name, positive, negative, layers, method, read, save, store_fields) -> str:
        """``Session.train``'s checks, all before compute; returns the method's current name."""
        import warnings

        from max_jupyter.steering.training import check_pairs, check_read, resolve_method

        check_vector_name("name", name)
        with warnings.catch_warnings():  # train_vector warns about identical pairs itself
            warnings.simplefilter("ignore")
            check_pairs(positive, negative)
        if layers is not None:
            check_layers(self._big.identity, layers, "layers")
        method = resolve_method(method)
        check_read(read)
        if not isinstance(save, bool):
            raise BadArgumentError(f"save={save!r} is not a bool; pass True (keep it in "
                                   f"session.vectors) or False.")
        if store_fields:
            if not save or not hasattr(self.vectors, "save"):
                raise BadArgumentError(f"store fields {sorted(store_fields)} are kept only when "
                                       f"saving to a VectorStore library; leave them out.")
            from max_jupyter.steering.store import check_save_fields

            fields = dict(store_fields)
            taken = sorted({"method", "pairs"} & set(fields))
            if taken:
                raise BadArgumentError(f"store fields {taken} are set by train itself (the method "
                                       f"and the pairs it trained on); leave them out.")
            if not isinstance(fields.pop("replace", False), bool):
                raise BadArgumentError(f"replace={store_fields['replace']!r} is not a bool; pass "
                                       f"True to drop the name's old versions, or False.")
            check_save_fields(**fields)
        info = getattr(self.vectors, "info", None)
        if save and info is not None and not store_fields.get("replace") and name in self.vectors:
            if info(name).model != self._big.identity:  # the store would refuse it after training
                raise BadArgumentError(f"name={name!r} holds vectors for {info(name).model.describe()}; "
                                       f"train under another name, or pass replace=True.")
        return method

    def _store(self, name: str, vector: SteeringVector, method: str, positive: Sequence[str],
               negative: Sequence[str], fields: dict) -> None:
        save = getattr(self.vectors, "save", None)
        if save is not None:
            save(name, vector, method=method,
                 pairs=list(zip(positive, negative)), **fields)
        else:
            self.vectors[name] = vector

    def _wait(self, job: CallJob, wait: bool, tick: Callable[[], None] | None = None,
              keep_on_interrupt: bool = False) -> object:
        """Submit ``job`` and wait for its value on this thread, calling ``tick`` about ten
        times a second; Ctrl-C marks it cancelled, waits for it to end, then re-raises
        (``keep_on_interrupt``: returns the value it ended with instead)."""
        self._worker.submit(job, wait=wait)
        try:
            while not futures.wait([job.future], timeout=0.1).done:
                if tick is not None:
                    tick()
        except KeyboardInterrupt:
            job.cancelled.set()
            futures.wait([job.future])  # the worker finishes (or skips) the job before we go on
            if not keep_on_interrupt:
                raise
        if tick is not None:
            tick()
        return job.future.result()

    # Closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the running generation, cancel queued ones, free both engines (GPU memory
        goes back), close the vector library if ``Session.load`` opened it; the session
        refuses any later use. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._worker.close()
        finally:
            self._free_engines()
        if self._owns_store:
            getattr(self.vectors, "close", lambda: None)()

    def _free_engines(self) -> None:
        """Unload both engines and give their GPU memory back to the device."""
        for engine in (self._small, self._big):
            unload = getattr(engine, "unload", None)
            if unload is not None:
                unload()
        self._big = self._small = None
        self.last = self._started = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            if self.plan is not None:  # the backend capped torch's allocator at the plan
                torch.cuda.set_per_process_memory_fraction(1.0)
            # cuBLAS keeps a workspace per stream it ran on (32 MiB each on Hopper), the
            # engines' own streams included; torch's own leak checks free them this way.
            getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
            torch.cuda.empty_cache()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _VectorsAndConcepts(Mapping):
    """``Session.vectors_and_concepts``: the library's names and the concepts' names; a
    lookup trains a concept on first use (``Session.vector``)."""

    def __init__(self, session: Session):
        self._session = session

    def __getitem__(self, name: str) -> SteeringVector:
        if name not in self:
            raise KeyError(name)
        return self._session.vector(name)

    def __contains__(self, name: object) -> bool:
        return is_concept(name) or (isinstance(name, str) and name in self._session.vectors)

    def __iter__(self):
        return iter(sorted({*self._session.vectors, *concept_library()}))

    def __len__(self) -> int:
        return len({*self._session.vectors, *concept_library()})


def open_library(store: object) -> MutableMapping[str, SteeringVector]:
    """The vector library for ``store``: "default" (VectorStore at its default path), None
    (a dict in memory), a path (a VectorStore there) or a VectorStore / mapping as is."""
    if store is None:
        return {}
    if isinstance(store, MutableMapping):
        return store
    from max_jupyter.steering.store import VectorStore

    return VectorStore() if store == "default" else VectorStore(store)
