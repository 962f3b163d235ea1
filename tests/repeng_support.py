"""The real repeng (vgel/repeng) for interoperability tests, and a HF copy of the embedded
model for it to run on.

repeng 0.4.0 declares ``numpy<2``, but the only thing NumPy 2 breaks is ``np.float_`` in
three type annotations, evaluated once at import; the alias is set for that import only.
Install it without its pins: ``pip install --no-deps repeng==0.4.0 scikit-learn``.
Without it these fixtures skip, saying so.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

INSTALL = "pip install --no-deps repeng==0.4.0 scikit-learn"


@pytest.fixture(scope="session")
def repeng():
    """The ``repeng`` module (skips the test where it is not installed)."""
    added = not hasattr(np, "float_")
    if added:
        np.float_ = np.float64
    try:
        return pytest.importorskip("repeng", reason=f"repeng is not installed: {INSTALL}")
    finally:
        if added:
            del np.float_


@pytest.fixture(scope="session")
def hf_copy():
    """``(model, tokenizer)``: the embedded model as a plain HF model in fp32, its own
    instance (repeng's ``ControlModel`` rewires the layers of the model it wraps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from max_jupyter.models import resolve_hf_folder

    folder = resolve_hf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)
