"""Request bodies of the OpenAI wire format, as this server accepts them.

Types are strict (a string where a number belongs is a 400, not a conversion). Parameters
this server cannot honour are refused, not ignored: an unknown parameter is a 400, and the
OpenAI parameters listed in ``NEUTRAL`` are accepted only with their no-op value (what many
clients send by default), otherwise a 400 saying so. Extensions (``extra_body`` in the
``openai`` client): ``steering`` (a steering expression such as ``"0.3 joy @response"``,
docs/steering.md, or vector name -> coefficient, from the session's vector library),
``judges`` (judge names, ``[]`` for none), ``ignore_eos``, ``speculate`` (the
longest draft of speculative decoding, ``0..MAX_SPECULATE``). A JSON ``null`` means "not
given", for every parameter.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from max_jupyter.orchestrator.speculative import MAX_SPECULATE
from max_jupyter.validation import MAX_SEED, check_role

PENALTIES = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},)}
"""Parameters accepted only with these values (or null); anything else is a 400."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """A chat turn; its role is checked by the rule Python uses (``check_role``: ``developer``
    counts as ``system``); content is text (or text parts)."""

    role: str
    content: str | list[TextPart]

    @field_validator("role")
    @classmethod
    def _role(cls, role: str) -> str:
        return check_role("role", role)

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            kinds = {p.get("type") for p in content if isinstance(p, dict)} - {"text"}
            if kinds:
                raise ValueError(f"message content parts of type {sorted(map(str, kinds))} are "
                                 "not supported: this server takes text only.")
        return content

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class _GenerationRequest(_Strict):
    """Fields shared by both endpoints; ``NEUTRAL`` lists the no-op-only parameters."""

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = PENALTIES

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = 1
    stop: str | list[str] | None = None
    user: str | None = None  # an end-user id; recorded nowhere
    steering: str | dict[str, float] | None = None
    judges: list[str] | None = None
    ignore_eos: bool = False
    speculate: int | None = Field(None, ge=0, le=MAX_SPECULATE)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None}  # null: not given
        for name, neutral in cls.NEUTRAL.items():
            value = data.pop(name, None)
            if value is not None and (isinstance(value, bool) != isinstance(neutral[0], bool)
                                      or value not in neutral):
                raise ValueError(f"{name}={value!r} is not supported by this server; leave it "
                                 f"out or send {neutral[0]!r}.")
        return data

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n} is not supported: this server returns one choice; send n=1.")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty; remove the empty one.")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **PENALTIES, "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
        "tool_choice": ("none",), "response_format": ({"type": "text"},)}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_limit(self) -> ChatRequest:
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise ValueError(f"max_tokens={a} and max_completion_tokens={b} disagree; send one.")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: one prompt (text or token ids), no chat template."""

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **PENALTIES, "echo": (False,), "best_of": (1,), "logprobs": (0,), "suffix": ("",)}

    prompt: str | list[int] | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError(f"prompt holds {len(prompt)} prompts; this server takes one "
                                 "per request.")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt is empty; send some text or token ids.")
        return prompt

    @property
    def limit(self) -> int | None:
        return self.max_tokens
