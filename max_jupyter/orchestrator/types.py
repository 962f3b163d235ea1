"""Types shared by the loop, the mirror, the trace and the Session: prompts and steering,
and the helpers that turn them into ids and mixes."""
from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from typing import TypeVar

from max_jupyter.engines.base import Engine
from max_jupyter.errors import BadArgumentError
from max_jupyter.steering.mix import Mix
from max_jupyter.steering.vector import SteeringVector
from max_jupyter.tokenizer import Message
from max_jupyter.validation import check_token_ids, fail

T, R = TypeVar("T"), TypeVar("R")
Prompt = str | Sequence[Message] | Sequence[int]
"""A user turn (text), chat messages (``{"role", "content"}`` dicts) or token ids."""
Steering = Mix | SteeringVector | None
"""A mix (re-read every step) or one vector at coefficient 1."""


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


def with_system(prompt: Prompt, system: str | None) -> Prompt:
    """``prompt`` with a system message first (text becomes a user turn); unchanged
    without ``system``. Token ids cannot take one."""
    if system is None:
        return prompt
    if isinstance(prompt, str):
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        return [{"role": "system", "content": system}, *prompt]
    raise BadArgumentError("system= needs a text or chat-message prompt; token ids already "
                           "hold any system turn.")


def as_mix(steering: Steering) -> Mix | None:
    """``steering`` as a mix: a vector alone counts at coefficient 1."""
    return Mix.of(steering) if isinstance(steering, SteeringVector) else steering


def run_to_end(items: Generator[T, None, R], on_item: Callable[[T], None] | None = None) -> R:
    """Exhaust a generator, passing each item to ``on_item``; return its return value."""
    while True:
        try:
            item = next(items)
        except StopIteration as done:
            return done.value
        if on_item:
            on_item(item)
