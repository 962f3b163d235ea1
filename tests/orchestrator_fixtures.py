"""Fixtures for the orchestrator tests: a second instance of the embedded model (the small
model with the same vocabulary) and a tiny random Llama with its own byte-level BPE
tokenizer, trained here (the small model with a different tokenizer).

Import the fixtures by name into a test module: ``from orchestrator_fixtures import small, tiny``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from max_jupyter.engines import TransformersEngine

TINY_TEXT = [
    "The weather today is sunny with a light breeze from the west.",
    "Once upon a time there was a small cat who loved to read stories.",
    "Steering a language model means adding a direction to its residual stream.",
    "The quick brown fox jumps over the lazy dog, and then it rests in the shade.",
    "Numbers like 12, 345 and 6789 appear in text; so do symbols: (a + b) * c.",
    "A question? An answer! Some lines end here.\nOthers continue on the next line.",
]


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Train a ~300-token byte-level BPE on ``TINY_TEXT`` and save it with a randomly
    initialised 2-layer Llama (hidden 64) as a HF folder; return ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TINY_TEXT, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small() -> TransformersEngine:
    """A second instance of the embedded model: the same vocabulary, its own KV cache."""
    return TransformersEngine.load(device="cpu")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TransformersEngine:
    """A tiny random Llama whose tokenizer differs from the embedded model's."""
    return TransformersEngine.load(build_tiny_model(tmp_path_factory.mktemp("tiny")), device="cpu")
