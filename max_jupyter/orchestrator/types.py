"""Types shared by the loop, the mirror, the trace and the Session: prompts, steering,
the finished generation, and the helpers that turn them into ids and mixes."""
from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from max_jupyter.engines.base import Engine, LayerDeltas
from max_jupyter.steering.controller import SteeringController
from max_jupyter.steering.vector import SteeringVector
from max_jupyter.tokenizer import Message
from max_jupyter.validation import check_token_ids, fail

T, R = TypeVar("T"), TypeVar("R")
Prompt = str | Sequence[Message] | Sequence[int]
"""A user turn (text), chat messages (``{"role", "content"}`` dicts) or token ids."""
Steering = SteeringController | SteeringVector | None
"""A mix (re-read every step) or one vector at coefficient 1."""


@dataclass
class Generation:
    """One finished generation. ``finish_reason``: eos, stop, length or interrupted.
    ``incomplete``: the last tokens ended inside a character, whose bytes were dropped from
    ``text`` (never shown as U+FFFD)."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    elapsed_s: float = 0.0
    incomplete: bool = False

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s else 0.0


def prompt_ids(engine: Engine, prompt: Prompt, chat: bool = True) -> list[int]:
    """Token ids for ``prompt``: ids pass through; text and messages go through the chat
    template when ``chat`` (plain text with special tokens otherwise).

    Raises ``BadArgumentError`` before any compute for an empty prompt, ``bytes``, ids
    outside the vocabulary, malformed chat messages or text with lone surrogates, and
    ``ContextOverflowError`` before tokenising text too long for any context to hold.
    """
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt
                                   and isinstance(prompt[0], Mapping)):  # before tokenising any
        engine.tokenizer.check_fits([prompt] if isinstance(prompt, str) else
                                    [m.get("content") for m in prompt if isinstance(m, Mapping)],
                                    engine.max_seq_len)
    if isinstance(prompt, str):
        ids = (engine.tokenizer.chat(prompt) if chat else engine.tokenizer.encode(prompt, True)
               ) if prompt else []
    elif isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise fail("prompt", prompt, f"is a {type(prompt).__name__}",
                   "pass a str (decode bytes with .decode('utf-8')), chat messages or a list of token ids")
    elif prompt and isinstance(prompt[0], Mapping):
        ids = engine.tokenizer.chat(prompt)  # checks every message
    else:
        ids = check_token_ids("prompt", prompt, engine.identity.vocab_size) if prompt else []
    if not ids:
        raise fail("prompt", prompt, "is empty", "give text, chat messages or token ids")
    return ids


def as_mix(steering: Steering) -> SteeringController | None:
    """``steering`` as a mix: a vector alone counts at coefficient 1."""
    return SteeringController.of(steering) if isinstance(steering, SteeringVector) else steering


def steering_deltas(engine: Engine, steering: Steering) -> LayerDeltas | None:
    """Current deltas of ``steering`` for ``engine`` (a vector counts at coefficient 1);
    raises ``ModelMismatchError`` if it was made for another model."""
    mix = as_mix(steering)
    return mix.deltas(engine) if mix is not None else None


def run_to_end(items: Generator[T, None, R], on_item: Callable[[T], None] | None = None) -> R:
    """Exhaust a generator, passing each item to ``on_item``; return its return value."""
    while True:
        try:
            item = next(items)
        except StopIteration as done:
            return done.value
        if on_item:
            on_item(item)
