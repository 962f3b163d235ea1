"""Engines: the token-level contract (``base``) and its backends.

``TransformersEngine`` is the reference; ``ExLlamaV2Engine`` (GPU) lives in
``max_jupyter.engines.exllamav2`` and is imported only when asked for.
"""
from max_jupyter.engines.base import (ContextOverflowError, Engine, ForwardResult, LayerDeltas,
                                      ModelIdentity)
from max_jupyter.engines.transformers import TransformersEngine

__all__ = ["ContextOverflowError", "Engine", "ForwardResult", "LayerDeltas", "ModelIdentity",
           "TransformersEngine"]
