"""Engines: the token-level contract (``base``) and its backends.

``TransformersEngine`` is the reference; ``ExLlamaV2Engine`` (GPU) lives in
``max_jupyter.engines.exllamav2`` and is imported only when asked for; so is the transformers backend.
"""
from max_jupyter.engines.base import Engine, ForwardResult, LayerDeltas, ModelIdentity
from max_jupyter.errors import ContextOverflowError


def __getattr__(name: str):
    """Import the transformers backend (and transformers itself) only when first used."""
    if name == "TransformersEngine":
        from max_jupyter.engines.transformers import TransformersEngine

        return TransformersEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ContextOverflowError", "Engine", "ForwardResult", "LayerDeltas", "ModelIdentity",
           "TransformersEngine"]
