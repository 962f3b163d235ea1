"""GPU decode speed of interventions beyond addition on the ExLlamaV2 backend (a lent GPU):
unsteered decode against ablation at every layer, 3 additions, and 3 additions + 1 ablation
+ 1 clamp (docs/steering.md).

One run, one table. The Qwen2.5-7B-shaped model with random weights, 4-bit GPTQ by
round-to-nearest (``bench/gpu_decode.py``'s, reused from ``$GPTQ_BENCH_DIR`` when another
bench of the same call wrote it), batch 1, our plain generation loop (``gpu_decode.plain_run``:
forward, greedy pick on the host, detokenisation) from the same 1024-token prompt, timed over
``NEW`` tokens after the first. The configurations are ``bench/cpu_interventions.py``'s,
written as expressions and compiled as everywhere else; the interventions run inside the
captured decode graphs. Rounds interleave the configurations (one warm-up round first,
which captures the graphs); the table shows the median ms/token and its ratio to unsteered.
Targets: ablation at every layer <= 1.03x unsteered; the mix <= 1.05x.
Run: ``bash bench/gpu_session.sh interventions`` (see docs/gpu.md). Writes
``$OUT/gpu_interventions.json``.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cpu_interventions import configurations
from gpu_decode import gptq_folder, plain_run

from max_jupyter.engines.exllamav2 import ExLlamaV2Engine

PROMPT, NEW, ROUNDS = 1024, 256, 5


def main() -> None:
    tokenizer_dir = Path(os.environ["MAX_JUPYTER_TOKENIZER"])
    out = Path(os.environ.get("OUT", tempfile.gettempdir()))
    torch.backends.cuda.enable_cudnn_sdp(False)  # as in gpu_decode: cuDNN re-plans per KV length
    folder = gptq_folder("7B", tokenizer_dir, Path(tempfile.mkdtemp(prefix="maxinterv-")))
    engine = ExLlamaV2Engine.load(folder, cache_tokens=2048)
    ids = torch.randint(0, 49152, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    steerings = configurations(engine)
    ms: dict[str, list[float]] = {name: [] for name in steerings}
    for round_ in range(ROUNDS + 1):
        for name, steering in steerings.items():
            seconds, _ = plain_run(engine, ids, steering, new=NEW)
            if round_:  # round 0 is the warm-up
                ms[name].append(1e3 * seconds / NEW)
    median = {name: statistics.median(m) for name, m in ms.items()}
    base = median["unsteered"]
    card = torch.cuda.get_device_name()
    print(f"\n{card}, 7B-shaped 4-bit GPTQ, batch 1, {PROMPT}-token prompt, {NEW} tokens, "
          f"median of {ROUNDS} interleaved rounds")
    print("| configuration | ms/token | runs (min-max) | vs unsteered |")
    print("|---|---:|---:|---:|")
    for name, m in ms.items():
        print(f"| {name} | {median[name]:.2f} | {min(m):.2f}-{max(m):.2f} | {median[name] / base:.3f} |")
    print(f"targets: ablation <= 1.03 -> {median['ablation at every layer (!d)'] / base:.3f}; "
          f"mix <= 1.05 -> {median['3 adds + 1 ablation + 1 clamp'] / base:.3f}")
    (out / "gpu_interventions.json").write_text(json.dumps({
        "card": card, "commit": os.environ.get("MAX_JUPYTER_COMMIT", "unknown"), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "prompt": PROMPT, "new": NEW,
        "rounds": ROUNDS, "ms": ms}, indent=1))
    engine.unload()


if __name__ == "__main__":
    main()
