"""A request body -> the prompt and the Session's ``GenerationOptions``, checked before
anything is sent.

Everything a client can get wrong is refused here as ``APIError(400)`` — before the 200
of a stream — so a generation that starts has only the model left to fail. Omitted
parameters take the notebook's ``session.defaults``; the request's own values win.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from max_jupyter.errors import BadArgumentError, ContextOverflowError
from max_jupyter.orchestrator.options import OPTION_NAMES, GenerationOptions
from max_jupyter.orchestrator.types import Prompt, prompt_ids
from max_jupyter.server.errors import APIError
from max_jupyter.server.protocol import ChatRequest, CompletionRequest
from max_jupyter.steering.expression import Expression, parse
from max_jupyter.validation import check_token_ids


def generation_options(session, request: ChatRequest | CompletionRequest
                       ) -> tuple[Prompt, GenerationOptions]:
    """The prompt and the ``GenerationOptions`` for ``session.start``: the notebook's
    ``session.defaults`` with the request's values.

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
    changes: dict[str, Any] = {"max_new_tokens": limit, "chat": chat, "system": None,
                               "ignore_eos": request.ignore_eos}
    changes.update({k: v for k in ("temperature", "top_p", "seed", "stop", "speculate")
                    if (v := getattr(request, k)) is not None})
    if isinstance(request.steering, str):
        changes["steering"] = _expression(session, request.steering)
    elif request.steering:
        changes["steering"] = _known("steering", request.steering, session.vectors_and_concepts,
                                     "the session's vector library or concepts", "unknown_vector")
    if request.judges is not None:
        changes["judges"] = list(_known("judges", request.judges, session.judges,
                                        "the session's judges", "unknown_judge"))
    try:
        return prompt, defaults.replace(**changes)
    except BadArgumentError as e:  # messages start with the option's name: "steering['x']=..."
        name = re.match(r"[a-z_]*", str(e)).group()
        raise APIError(400, str(e), param=name if name in OPTION_NAMES else None) from None


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


def _expression(session, text: str) -> Expression:
    """The steering expression ``text``, parsed and its names checked against the session
    (compiled again when the generation starts), else a 400 naming the column."""
    try:
        expression = parse(text)
        session.compile(expression)
    except BadArgumentError as e:
        raise APIError(400, str(e), param="steering", code="invalid_steering") from None
    return expression


def _known(param: str, names: Collection[str], known: Collection[str], where: str,
           code: str) -> Collection[str]:
    """``names`` where each is in ``known``, else a 400 naming the unknown ones."""
    unknown = [name for name in names if name not in known]
    if unknown:
        raise APIError(400, f"{param} names {unknown} are not in {where}; it has "
                       f"{sorted(known)} (GET /v1/vectors).", param=param, code=code)
    return names
