"""The step loop: sampling, stop strings, the plain loop and the cognitive orchestrator."""
from max_jupyter.orchestrator.cognitive import CognitiveOrchestrator
from max_jupyter.orchestrator.judges import (DEFAULT_MIX, Always, DivergenceJudge, FunctionJudge,
                                             Judge, JudgeContext, JudgeError, Never, ProbeJudge,
                                             Verdict)
from max_jupyter.orchestrator.mirror import ContextMirror, MirrorError
from max_jupyter.orchestrator.options import GenerationOptions
from max_jupyter.orchestrator.plain import generate, stream
from max_jupyter.orchestrator.types import Generation
from max_jupyter.orchestrator.sampling import Sampler, SamplingConfig
from max_jupyter.orchestrator.trace import (GenerationResult, StepEvent, StepRecord, TopK,
                                            TraceConfig)

__all__ = ["DEFAULT_MIX", "Always", "CognitiveOrchestrator", "ContextMirror", "DivergenceJudge",
           "FunctionJudge", "Generation", "GenerationOptions", "GenerationResult", "Judge",
           "JudgeContext", "JudgeError", "MirrorError", "Never", "ProbeJudge", "Sampler",
           "SamplingConfig", "StepEvent", "StepRecord", "TopK", "TraceConfig", "Verdict",
           "generate", "stream"]
