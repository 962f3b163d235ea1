"""A request body -> the Session's generation options, checked before anything is sent.

Everything a client can get wrong is refused here as ``APIError(400)`` — before the 200
of a stream — so a generation that starts has only the model left to fail. Omitted
parameters take the notebook's ``session.defaults``; the request's own values win.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from max_jupyter.errors import BadArgumentError, ContextOverflowError
from max_jupyter.orchestrator.types import prompt_ids
from max_jupyter.server.errors import APIError
from max_jupyter.server.protocol import ChatRequest, CompletionRequest
from max_jupyter.validation import check_coef, check_token_ids


def generation_options(session, request: ChatRequest | CompletionRequest) -> dict[str, Any]:
    """Keyword options for ``session.start`` (the prompt under ``prompt``).

    Tokenises the prompt (chat messages through the model's chat template, with
    ``session.defaults.system`` first when the messages carry no system turn) and checks
    it and ``max_tokens`` fit the context, the steering names and judges exist.
    """
    try:
        prompt, chat, ids = _prompt(session, request)
    except ContextOverflowError as e:
        raise APIError(400, str(e), param="messages" if isinstance(request, ChatRequest) else "prompt",
                       code="context_length_exceeded") from None
    defaults = session.defaults
    limit = request.limit if request.limit is not None else defaults.max_new_tokens
    room = session.big.max_seq_len - len(ids)
    if limit > room:
        raise APIError(400, f"the prompt has {len(ids)} tokens and max_tokens={limit} more would "
                       f"exceed the model's context of {session.big.max_seq_len} tokens; "
                       f"shorten the prompt or send max_tokens <= {max(room, 0)}.",
                       param="max_tokens" if room > 0 else "messages", code="context_length_exceeded")
    options: dict[str, Any] = {"prompt": prompt, "max_new_tokens": limit,
                               "sampling": _sampling(defaults.sampling, request),
                               "chat": chat, "system": None, "ignore_eos": request.ignore_eos}
    if request.stop is not None:
        options["stop"] = request.stop
    if request.steering:
        options["steering"] = _steering(session, request.steering)
    if request.judges is not None:
        options["judges"] = _judges(session, request.judges)
    if request.speculate is not None:
        options["speculate"] = request.speculate
    return options


def _prompt(session, request: ChatRequest | CompletionRequest) -> tuple[Any, bool, list[int]]:
    """(the prompt for ``session.start``, its ``chat`` flag, its big-model token ids). Chat
    messages and text go to the session as they are, not as ids, so a small model with
    another vocabulary reads them through its own chat template and tokenizer."""
    engine = session.big
    if isinstance(request, ChatRequest):
        messages = [m.as_template_message() for m in request.messages]
        system = session.defaults.system
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        return messages, True, prompt_ids(engine, messages)
    if isinstance(request.prompt, str):
        return request.prompt, False, prompt_ids(engine, request.prompt, chat=False)
    try:
        ids = check_token_ids("prompt", request.prompt, engine.identity.vocab_size)
    except BadArgumentError as e:
        raise APIError(400, str(e), param="prompt") from None
    return ids, False, ids


def _sampling(base, request: ChatRequest | CompletionRequest):
    """``base`` (the notebook's SamplingConfig) with the request's temperature/top_p/seed."""
    given = {k: v for k in ("temperature", "top_p", "seed")
             if (v := getattr(request, k)) is not None}
    return dataclasses.replace(base, **given) if given else base


def _steering(session, steering: dict[str, float]) -> dict[str, float]:
    unknown = [name for name in steering if name not in session.vectors]
    if unknown:
        raise APIError(400, f"steering names {unknown} are not in the session's vector library; "
                       f"it has {sorted(session.vectors)} (GET /v1/vectors).",
                       param="steering", code="unknown_vector")
    try:
        return {name: check_coef(f"steering[{name!r}]", coef) for name, coef in steering.items()}
    except BadArgumentError as e:
        raise APIError(400, str(e), param="steering") from None


def _judges(session, judges: list[str]) -> list[str]:
    unknown = [name for name in judges if name not in session.judges]
    if unknown:
        raise APIError(400, f"judges {unknown} are not in the session's judges; it has "
                       f"{sorted(session.judges)} (GET /v1/vectors).", param="judges",
                       code="unknown_judge")
    return list(judges)
