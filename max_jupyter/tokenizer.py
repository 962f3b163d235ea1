"""Tokenizer shared by every backend: HF ``tokenizers`` via transformers, with the chat
template, EOS ids and a streaming decoder that never emits half a UTF-8 character.

Text and chat messages are checked before tokenising (``BadArgumentError``): text must be
a ``str`` that encodes as UTF-8 (no lone surrogates); messages need a chat role and
``content`` strings.

Text from a user is always encoded as text: a ``<|im_start|>`` typed into a prompt, a chat
message, a magic cell or an HTTP request becomes the tokens of those characters, never the
control token. Only the chat template inserts control tokens (``chat``)."""
from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from max_jupyter.errors import BadArgumentError, ContextOverflowError
from max_jupyter.validation import check_messages, check_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]


class Tokenizer:
    """Wraps a HF tokenizer; ``eos_ids`` holds every id that ends a turn. Thread-safe: its
    encodes take turns (``_encode``), as every encode of ``hf`` must go through this."""

    def __init__(self, hf: PreTrainedTokenizerBase, extra_eos_ids: Sequence[int] = ()):
        self.hf = hf
        # A HF fast tokenizer keeps "split special tokens" as a flag on its shared Rust
        # tokenizer, set before each encode: two threads encoding at once (the server's
        # requests) could swap it between set and use, so a user's "<|im_start|>" would
        # become a control token or the template's markup plain text.
        self._encoding = threading.Lock()
        eos = {hf.eos_token_id} if hf.eos_token_id is not None else set()
        for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = hf.convert_tokens_to_ids(tok)
            # A missing token maps to the unk id; compare back (SmolLM2's unk id is
            # <|endoftext|>'s own id 0, which must stay an EOS id).
            if isinstance(tid, int) and hf.convert_ids_to_tokens(tid) == tok:
                eos.add(tid)
        self.eos_ids: frozenset[int] = frozenset(eos | set(extra_eos_ids))

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(folder)))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (the longest token string: a byte-level
        token holds one character per byte), so text longer than ``n`` times this needs
        more than ``n`` tokens."""
        return max(map(len, self.hf.get_vocab()))

    def check_fits(self, texts: Sequence[str], tokens: int) -> None:
        """``ContextOverflowError`` if ``texts`` together have more characters than ``tokens``
        tokens can hold: a bound checked before tokenising any of them (a 20 MB prompt is
        refused at once instead of being tokenised for a minute)."""
        chars, most = sum(len(t) for t in texts if isinstance(t, str)), tokens * self.max_token_chars
        if chars > most:
            raise ContextOverflowError(
                f"the prompt has {chars} characters, more than the context of {tokens} tokens "
                f"can hold (at most {most}: {self.max_token_chars} characters per token); "
                f"shorten the prompt.")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text`` as text: special-token strings in it are split into ordinary
        tokens (``add_special_tokens`` adds the tokenizer's own BOS/EOS, if it has any)."""
        return self._encode(check_text("text", text), add_special_tokens, split_special_tokens=True)

    def _encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False
                ) -> list[int]:
        """``hf.encode``, one thread at a time; ``split_special_tokens``: control-token
        strings in ``text`` become ordinary tokens (user text) or not (template markup)."""
        with self._encoding:
            return self.hf.encode(text, add_special_tokens=add_special_tokens,
                                  split_special_tokens=split_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token: int) -> str:
        """One token as text for people: its decoded text; a token holding part of a UTF-8
        character (which decodes alone to U+FFFD) shows the bytes it holds as ``<0xF0><0x9F>``
        (after any whole characters it holds)."""
        text = self.decode([token])
        if "\ufffd" not in text:
            return text
        raw = self.hf.convert_ids_to_tokens(token)
        data = _byte_level_bytes(raw)
        if data is None:  # not byte-level BPE: e.g. a byte-fallback token is already "<0xF0>"
            return raw if raw.startswith("<0x") else text
        return "".join(f"<0x{ord(c) - 0xDC00:02X}>" if 0xDC80 <= ord(c) <= 0xDCFF else c
                       for c in data.decode("utf-8", errors="surrogateescape"))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def chat(self, messages: Sequence[Message] | str, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` through the model's chat template (a str is one user turn).

        The template's own markup is encoded with its control tokens; each message's
        content is encoded as text (``encode``), so it cannot open or close a turn.
        Without a template, the turns' contents are joined by newlines.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = check_messages(messages)
        if not self.has_chat_template:
            return self.encode("\n".join(m["content"] for m in messages), add_special_tokens=True)
        # Render the template around placeholders, then encode the markup between them
        # with control tokens and each content (in its place) as text.
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        markup = self.hf.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                             tokenize=False, add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        for message, mark in zip(messages, marks):
            before, found, markup = markup.partition(mark)
            if not found:  # a template that drops or rewrites a content: never seen so far
                raise BadArgumentError(f"the chat template of this model rewrites message "
                                       f"contents ({message['role']} turn); pass token ids instead.")
            ids += self._encode(before) + self.encode(message["content"])
        return ids + self._encode(markup)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, in order (``""`` for a token ending inside a character;
    the completing token carries it). Their concatenation is the decoded text."""
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.feed(t) for t in ids]
    if pieces:
        pieces[-1] += decoder.flush()
    return pieces


class StreamDecoder:
    """Turns tokens fed one at a time into text pieces holding only whole characters.

    Decodes a short window of recent tokens and emits what the newest ones add (the
    incremental scheme of vLLM/TGI), so tokenizers that drop a leading space when a token is
    decoded alone stay correct. A token that ends inside a multi-byte UTF-8 character
    yields ``""`` until the token completing it arrives. ``flush`` returns the remainder,
    dropping a character left incomplete at the end (it never emits U+FFFD for one) and
    setting ``incomplete`` to True when it did.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into emitted text
        self.incomplete = False
        """True after a ``flush`` that dropped the bytes of an incomplete last character."""

    def feed(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """What is left at the end of a generation, without a trailing incomplete character."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self._tok.decode(self._ids[self._prefix:self._read])
        full = self._tok.decode(self._ids[self._prefix:])
        if final and full.endswith("\ufffd"):
            full = full.rstrip("\ufffd")
            self.incomplete = True
        if len(full) <= len(done) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(done):]


@functools.cache
def _byte_of() -> dict[str, int]:
    """Character -> byte of GPT-2's byte-level alphabet."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _byte_level_bytes(raw: str) -> bytes | None:
    """The bytes of a byte-level BPE token string (GPT-2's byte-to-character map), or None
    if ``raw`` is not one."""
    byte_of = _byte_of()
    if not raw or any(c not in byte_of for c in raw):
        return None
    return bytes(byte_of[c] for c in raw)
