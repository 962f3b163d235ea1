"""Chat template, EOS ids and streaming decode that never shows broken UTF-8."""
from __future__ import annotations


def test_chat_template_and_eos(engine):
    tok = engine.tokenizer
    ids = tok.chat("Hi")
    text = tok.decode(ids)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert tok.hf.convert_tokens_to_ids("<|im_end|>") in tok.eos_ids


def test_stream_decoder_never_emits_half_characters(engine):
    tok = engine.tokenizer
    text = "Café naïve — 日本語のテキスト 🙂🎉 ünïcödé, ok."
    ids = tok.encode(text)
    singles = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles), "the sample must split a character across tokens"
    decoder = tok.stream_decoder()
    pieces = [decoder.feed(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
