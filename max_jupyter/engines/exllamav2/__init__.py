"""ExLlamaV2 backend (CUDA): EXL2, GPTQ and fp16 model folders of the Llama and Qwen2 families.

``folder`` reads a model folder into exllamav2, ``plan`` lays out VRAM before anything is
allocated, ``engine`` is the ``Engine`` and its loading. exllamav2 itself is imported only
when a model is measured or loaded, so this package imports on machines without CUDA.
"""
from max_jupyter.engines.exllamav2.engine import MAX_DIRECT_ROWS, ExLlamaV2Engine, load_engines, load_pair
from max_jupyter.engines.exllamav2.folder import SUPPORTED_ARCHITECTURES, drop_zero_gptq_biases, read_config
from max_jupyter.engines.exllamav2.plan import (
                                                  CONTEXT_OVERHEAD,
                                                  GiB,
                                                  MeasuredPeak,
                                                  MemoryPlan,
                                                  ModelMemory,
                                                  VramBudgetError,
                                                  measure_model,
                                                  measured_peak,
                                                  plan_memory,
)

__all__ = ["CONTEXT_OVERHEAD", "ExLlamaV2Engine", "GiB", "MAX_DIRECT_ROWS", "MeasuredPeak",
           "MemoryPlan", "ModelMemory", "SUPPORTED_ARCHITECTURES", "VramBudgetError",
           "drop_zero_gptq_biases", "load_engines", "load_pair", "measure_model", "measured_peak",
           "plan_memory", "read_config"]
