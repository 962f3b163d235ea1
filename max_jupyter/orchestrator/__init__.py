"""The step loop: sampling, stop strings, the plain loop and the cognitive orchestrator."""
from max_jupyter.orchestrator.cognitive import CognitiveOrchestrator
from max_jupyter.orchestrator.judges import (
    DEFAULT_MIX,
    Always,
    DivergenceJudge,
    FunctionJudge,
    Judge,
    JudgeContext,
    JudgeError,
    Never,
    ProbeJudge,
    Verdict,
)
from max_jupyter.orchestrator.mirror import ContextMirror, MirrorError
from max_jupyter.orchestrator.options import GenerationOptions
from max_jupyter.orchestrator.plain import generate, stream
from max_jupyter.orchestrator.sampling import Sampler, SamplingConfig
from max_jupyter.orchestrator.trace import GenerationResult, StepEvent, StepRecord, TopK, TraceConfig

__all__ = ["DEFAULT_MIX", "Always", "CognitiveOrchestrator", "ContextMirror", "DivergenceJudge",
           "FunctionJudge", "GenerationOptions", "GenerationResult", "Judge",
           "JudgeContext", "JudgeError", "MirrorError", "Never", "ProbeJudge", "Sampler",
           "SamplingConfig", "StepEvent", "StepRecord", "TopK", "TraceConfig", "Verdict",
           "generate", "stream"]


def __getattr__(name: str):
    if name == "Generation":  # the old base of GenerationResult, its only subclass
        from max_jupyter.errors import warn_deprecated

        warn_deprecated("max_jupyter.orchestrator.Generation", "GenerationResult", 2)
        return GenerationResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
