"""Shared fixtures: the real embedded model (SmolLM2-135M-Instruct), loaded once."""
from __future__ import annotations

import pytest
import torch

from max_jupyter.engines import TransformersEngine


@pytest.fixture(scope="session")
def engine() -> TransformersEngine:
    """The embedded default model on the CPU in fp32 (converted once, then cached)."""
    torch.manual_seed(0)
    return TransformersEngine.load(device="cpu")


@pytest.fixture(scope="session")
def hf_model(engine):
    """The engine's underlying HF model, for reference forwards outside the engine."""
    return engine.model


def hf_forward(model, ids: list[int], **kwargs):
    """A plain HF forward of ``ids`` (no cache), for reference values."""
    with torch.inference_mode():
        return model(torch.tensor([ids]), **kwargs)
