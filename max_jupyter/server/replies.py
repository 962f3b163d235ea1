"""Response bodies of the OpenAI wire format: completions, stream chunks, usage, models.

Every body is a plain dict ready for JSON. A generation's trace summary rides along in the
extension field ``EXTENSION`` (the ``openai`` client keeps unknown fields: read it with
``response.model_extra["max_jupyter"]`` or ``getattr(response, "max_jupyter")``).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from max_jupyter.orchestrator.trace import GenerationResult

EXTENSION = "max_jupyter"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
"""Engine finish reasons -> OpenAI's; the others (aborted, interrupted: the generation was
stopped from the notebook) are sent as "stop", the engine's reason in the extension."""


def finish_reason(result: GenerationResult) -> str:
    return FINISH_REASONS.get(result.finish_reason, "stop")


def usage(result: GenerationResult) -> dict[str, int]:
    prompt, completion = len(result.prompt_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


@dataclass
class Reply:
    """One request's reply: its id, model and kind (chat or text completion)."""

    model: str
    chat: bool
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.model}

    def _choice(self, text: str, reason: str | None, chunk: bool, role: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if not self.chat:
            choice["text"] = text
        elif chunk:
            delta = {"role": "assistant"} if role else {}
            choice["delta"] = delta | ({"content": text} if text or role else {})
        else:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        return choice

    def whole(self, result: GenerationResult, summary: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed response for a finished generation."""
        return {**self._envelope(False),
                "choices": [self._choice(result.text, finish_reason(result), False)],
                "usage": usage(result), EXTENSION: summary}

    def chunk(self, text: str, first: bool = False) -> dict[str, Any]:
        """A stream chunk carrying ``text`` (the first chat chunk also carries the role)."""
        return {**self._envelope(True), "choices": [self._choice(text, None, True, first)]}

    def last_chunk(self, result: GenerationResult, summary: dict[str, Any],
                   with_usage: bool) -> dict[str, Any]:
        """The chunk with the finish reason (and the trace summary)."""
        body = {**self._envelope(True), "choices": [self._choice("", finish_reason(result), True)],
                EXTENSION: summary}
        return body | ({"usage": None} if with_usage else {})

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        """The final chunk of ``stream_options.include_usage``: no choices, the usage."""
        return {**self._envelope(True), "choices": [], "usage": usage(result)}


def sse(body: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or the literal ``[DONE]``) and a blank line."""
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False,
                                                         separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def model_list(name: str, created: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "max-jupyter"}]}
