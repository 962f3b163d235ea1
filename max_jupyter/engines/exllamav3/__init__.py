"""ExLlamaV3 backend (CUDA): EXL3 model folders of the Llama and Qwen2 families.

``folder`` checks a model folder and reads its headers, ``plan`` measures its VRAM for the
shared layout (``engines.exllamav2.plan.plan_memory``), ``engine`` is the ``Engine`` and
its loading. exllamav3 itself is imported only when a model is loaded, so this package
imports on machines without CUDA.
"""
from max_jupyter.engines.exllamav3.engine import ExLlamaV3Engine, load_engines, load_pair
from max_jupyter.engines.exllamav3.folder import SUPPORTED_ARCHITECTURES, read_raw_config
from max_jupyter.engines.exllamav3.plan import CACHE_BITS, check_cache_bits, measure_model

__all__ = ["CACHE_BITS", "ExLlamaV3Engine", "SUPPORTED_ARCHITECTURES", "check_cache_bits",
           "load_engines", "load_pair", "measure_model", "read_raw_config"]
