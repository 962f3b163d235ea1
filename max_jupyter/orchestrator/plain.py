"""The plain loop: one engine, an optional steering mix, no small model and no judge —
the ``CognitiveOrchestrator`` with nothing to watch or judge.

``generate`` returns a ``GenerationResult``; ``stream`` yields text pieces as they are
decoded (whole characters only; text that may begin a stop string is held back until
resolved). Ctrl-C during a generation ends it with ``finish_reason == "interrupted"`` and
the partial text; the engine stays usable (its forward restores the cache on interrupt,
and every generation starts from a fresh prefill).
"""
from __future__ import annotations

from collections.abc import Callable, Generator

from max_jupyter.engines.base import Engine
from max_jupyter.orchestrator.cognitive import DEFAULT_OPTIONS, CognitiveOrchestrator
from max_jupyter.orchestrator.options import GenerationOptions, merge_options
from max_jupyter.orchestrator.trace import GenerationResult
from max_jupyter.orchestrator.types import Prompt, Steering, run_to_end


def stream(engine: Engine, prompt: Prompt, options: GenerationOptions | None = None, *,
           steering: Steering = None, **changes) -> Generator[str, None, GenerationResult]:
    """Yield text pieces; the generator's return value (``StopIteration.value``) is the
    ``GenerationResult``.

    ``steering`` (a mix, or one vector at coefficient 1) is added at every step, and to the
    prompt's prefill too when ``steer_prompt`` (default True). A ``Mix`` is re-read every
    step, so changes to the mix from another thread apply from the next token on.
    ``options`` with ``changes``: see ``GenerationOptions`` (``judges`` and a per-call
    ``steering`` in it are the Session's).
    """
    options = merge_options(options, DEFAULT_OPTIONS, changes)
    events = CognitiveOrchestrator(engine, steering=steering).stream(prompt, options)
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            return done.value
        if event.text:
            yield event.text


def generate(engine: Engine, prompt: Prompt, options: GenerationOptions | None = None, *,
             steering: Steering = None, on_text: Callable[[str], None] | None = None,
             **changes) -> GenerationResult:
    """Run ``stream`` to the end, passing each text piece to ``on_text``; see ``stream``."""
    return run_to_end(stream(engine, prompt, options, steering=steering, **changes), on_text)
