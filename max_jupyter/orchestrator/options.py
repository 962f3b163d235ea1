"""``GenerationOptions``: every option of one generation as one typed, frozen value.

Defined and checked here, once: the magics, the server and Python build one (or pass
keywords that ``replace`` turns into one at once); the Session and the orchestrator read
its fields. What needs the models (the prompt's room in the context, trace layers, vector
and judge names) is checked where the models are: ``Session.start`` and
``CognitiveOrchestrator.prepare``.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from max_jupyter.errors import BadArgumentError
from max_jupyter.orchestrator.judges import Judge
from max_jupyter.orchestrator.sampling import SamplingConfig
from max_jupyter.orchestrator.speculative import MAX_SPECULATE
from max_jupyter.orchestrator.trace import TraceConfig
from max_jupyter.steering.expression import Expression, parse
from max_jupyter.steering.mix import Mix
from max_jupyter.steering.vector import SteeringVector
from max_jupyter.validation import check_coef, check_int, check_stop, check_str_list, check_text, fail, show

SAMPLING_KEYWORDS = ("temperature", "top_k", "top_p", "seed")
"""Keywords that ``replace`` puts into ``sampling`` (the fields of ``SamplingConfig``)."""

CallSteering = Mix | SteeringVector | Mapping[str, float] | Expression | None
"""A generation's own steering: a mix, a vector (coefficient 1), {vector name: coef}, or a
steering expression (text, kept parsed: docs/steering.md)."""


@dataclass(frozen=True)
class GenerationOptions:
    """The options of one generation (``Session.defaults`` holds the session's; change them
    with ``session.defaults = session.defaults.replace(...)``). Checked at construction
    (``BadArgumentError``, one line naming the option, its value and the fix)."""

    max_new_tokens: int = 128
    sampling: SamplingConfig = SamplingConfig()
    stop: tuple[str, ...] = ()
    """Strings that end the generation (never shown)."""
    trace: TraceConfig = TraceConfig()
    chat: bool = True
    """Text goes through the chat template (else plain text with special tokens)."""
    steer_prompt: bool = True
    """The prompt's prefill is steered too."""
    ignore_eos: bool = False
    """Keep going past EOS tokens (benchmarks of a fixed length)."""
    system: str | None = None
    """A system message put before a text or chat prompt."""
    mirror: bool = True
    """Mirror the small model (when one is loaded) even if no judge reads it: its logits
    and states land in the trace."""
    speculate: int = 0
    """Speculative decoding: the small model (same vocabulary) drafts up to this many tokens
    a step for the big one to verify in one pass. Greedy gives the same tokens, sampling the
    same distribution, with the same judges and steering as without it; 0 is off
    (docs/speculative.md)."""
    steering: CallSteering = None
    """This generation's own steering, applied at every step on top of the live mix."""
    judges: tuple[str | Judge, ...] | None = None
    """Judges of this generation: names in ``Session.judges`` or ``Judge`` objects; None:
    the session's judges, ``()``: none."""
    probes: tuple[str, ...] = ()
    """Library concepts whose probe reads the text after every token
    (``GenerationResult.probe_scores``; ``Session.probe``)."""

    def __post_init__(self):
        checked = {
            "max_new_tokens": check_int("max_new_tokens", self.max_new_tokens, low=1,
                                        fix="use a whole number >= 1 such as 128"),
            "sampling": _sampling(self.sampling),
            "stop": check_stop(self.stop),
            "trace": _instance("trace", self.trace, TraceConfig,
                               "pass TraceConfig(big_layers=..., small_layers=..., top_k=...)"),
            **{name: _flag(name, getattr(self, name))
               for name in ("chat", "steer_prompt", "ignore_eos", "mirror")},
            "system": None if self.system is None else check_text("system", self.system),
            "speculate": check_int("speculate", self.speculate, low=0, high=MAX_SPECULATE,
                                   fix=f"use 0 (off) up to {MAX_SPECULATE} draft tokens (typical 4)"),
            "steering": _steering(self.steering),
            "judges": _judges(self.judges),
            "probes": check_str_list("probes", (self.probes,) if isinstance(self.probes, str) else self.probes),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> GenerationOptions:
        """A copy with ``changes``: option names, and ``temperature`` / ``top_k`` / ``top_p``
        / ``seed``, which change ``sampling``. An unknown name is refused with the closest
        known one."""
        for name in changes:
            if name not in OPTION_NAMES:
                raise unknown_option(name)
        sampling = {k: changes.pop(k) for k in SAMPLING_KEYWORDS if k in changes}
        if sampling:
            base = _sampling(changes.get("sampling", self.sampling))
            changes["sampling"] = dataclasses.replace(base, **sampling)
        return dataclasses.replace(self, **changes) if changes else self


OPTION_NAMES = (*(f.name for f in dataclasses.fields(GenerationOptions)), *SAMPLING_KEYWORDS)
"""The names ``GenerationOptions.replace`` (and so ``Session.generate``) accepts."""


def merge_options(options: Any, defaults: GenerationOptions, changes: Mapping[str, Any]
                  ) -> GenerationOptions:
    """``options`` (None: ``defaults``) with ``changes`` applied (see ``replace``)."""
    if options is None:
        options = defaults
    elif not isinstance(options, GenerationOptions):
        raise fail("options", options, f"is a {type(options).__name__}, not GenerationOptions",
                   "pass GenerationOptions(...) or the options as keywords")
    return options.replace(**changes) if changes else options


def unknown_option(name: str) -> BadArgumentError:
    """The error for an option name that does not exist, with the closest one."""
    close = difflib.get_close_matches(name, OPTION_NAMES, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "check the spelling."
    return BadArgumentError(f"unknown generation option {name!r}; {hint} (options: "
                            f"{', '.join(OPTION_NAMES)})")


def _instance(name: str, value: Any, kind: type, fix: str) -> Any:
    if not isinstance(value, kind):
        raise fail(name, value, f"is a {type(value).__name__}, not a {kind.__name__}", fix)
    return value


def _sampling(value: Any) -> SamplingConfig:
    return _instance("sampling", value, SamplingConfig,
                     "use SamplingConfig(**d)" if isinstance(value, Mapping) else
                     "pass SamplingConfig(temperature=..., top_k=..., top_p=..., seed=...) or "
                     "the keywords temperature=, top_k=, top_p=, seed=")


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(name, value, f"is a {type(value).__name__}, not a bool", "pass True or False")
    return value


def _steering(value: Any) -> CallSteering:
    """A call's steering as given, a {name: coef} mapping copied with each coef checked."""
    if value is None or isinstance(value, (Mix, SteeringVector, Expression)):
        return value
    if isinstance(value, str):
        return parse(value)  # a syntax error is refused here, with its column
    if not isinstance(value, Mapping):
        raise fail("steering", value, "is not steering",
                   "give a steering expression such as '0.3 joy @response', a SteeringVector, "
                   "a Mix or {vector name: coefficient}")
    for name in value:
        if not isinstance(name, str) or not name:
            raise fail("steering", value, f"has the key {show(name)}",
                       "name vectors of the library by non-empty str")
    return {name: check_coef(f"steering[{name!r}]", coef) for name, coef in value.items()}


def _judges(value: Any) -> tuple[str | Judge, ...] | None:
    """None, or the judges as a tuple of names and ``Judge`` objects (one may be bare)."""
    if value is None:
        return None
    if isinstance(value, (str, Judge)):
        return (value,)
    if not isinstance(value, Sequence):
        raise fail("judges", value, f"is a {type(value).__name__}",
                   "give judge names, Judge objects, a list of them, or [] for none")
    for i, judge in enumerate(value):
        if not isinstance(judge, (str, Judge)):
            raise fail(f"judges[{i}]", judge, f"is a {type(judge).__name__}",
                       "give a judge name (a key of session.judges) or a Judge")
    return tuple(value)
