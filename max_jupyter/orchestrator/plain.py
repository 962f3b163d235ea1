"""The plain generation loop: one engine, an optional steering mix, no judge.

``generate`` returns a ``Generation``; ``stream`` yields text pieces as they are decoded
(whole characters only; text that may begin a stop string is held back until resolved).
Ctrl-C during a generation ends it with ``finish_reason == "interrupted"`` and the partial
text; the engine stays usable (its forward restores the cache on interrupt, and every
generation starts from a fresh prefill).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from max_jupyter.engines.base import Engine, check_room
from max_jupyter.orchestrator.sampling import Sampler, SamplingConfig
from max_jupyter.orchestrator.stopping import StopStrings
from max_jupyter.orchestrator.types import (Generation, Prompt, Steering, as_mix, prompt_ids,
                                            run_to_end, steering_deltas)


def stream(engine: Engine, prompt: Prompt, *, max_new_tokens: int = 128,
           sampling: SamplingConfig = SamplingConfig(), stop: Sequence[str] = (),
           steering: Steering = None, steer_prompt: bool = True, chat: bool = True,
           ignore_eos: bool = False) -> Iterator[str]:
    """Yield text pieces; the generator's return value (``StopIteration.value``) is the
    ``Generation``.

    ``steering`` (a mix, or one vector at coefficient 1) is added at every step, and to the
    prompt's prefill too when ``steer_prompt``. A ``SteeringController`` is re-read every
    step, so changes to the mix from another thread apply from the next token on.
    ``ignore_eos`` keeps going past EOS tokens (for benchmarks of a fixed length).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
    ids = prompt_ids(engine, prompt, chat)
    check_room(engine, len(ids) + max_new_tokens, from_empty=True)
    stops = StopStrings(stop)
    sampler = Sampler(sampling)
    decoder = engine.tokenizer.stream_decoder()
    result = Generation(prompt_ids=ids)
    mix = as_mix(steering)  # deltas cached per mix version: one lookup per unchanged step
    start = time.perf_counter()
    try:
        logits = engine.prefill(ids, steering_deltas(engine, mix) if steer_prompt else None).logits
        while True:
            token, _ = sampler.sample(logits)
            if token in engine.tokenizer.eos_ids and not ignore_eos:
                result.finish_reason = "eos"
                break
            result.token_ids.append(token)
            piece = stops.feed(decoder.feed(token))
            if piece:
                result.text += piece
                yield piece
            if stops.stopped:
                result.finish_reason = "stop"
                break
            if len(result.token_ids) >= max_new_tokens:
                break
            logits = engine.step(token, steering_deltas(engine, mix)).logits
    except KeyboardInterrupt:
        result.finish_reason = "interrupted"
    tail = stops.drain(decoder)
    if tail:
        result.text += tail
        yield tail
    result.elapsed_s = time.perf_counter() - start
    return result


def generate(engine: Engine, prompt: Prompt, *, on_text: Callable[[str], None] | None = None,
             **options) -> Generation:
    """Run ``stream`` to the end, passing each text piece to ``on_text``; see ``stream`` for
    the options (max_new_tokens, sampling, stop, steering, steer_prompt, chat, ignore_eos)."""
    return run_to_end(stream(engine, prompt, **options), on_text)
