"""The step loop: sampling, stop strings and generation over engines."""
from max_jupyter.orchestrator.plain import Generation, generate, stream
from max_jupyter.orchestrator.sampling import Sampler, SamplingConfig

__all__ = ["Generation", "Sampler", "SamplingConfig", "generate", "stream"]
