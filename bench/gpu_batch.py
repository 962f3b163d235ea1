"""Batched decode on the ExLlamaV2 backend (a lent GPU): tokens/s at batch 1, 4, 16 and 64
against batch 1, and per-row distinct steering against one shared configuration.

A Qwen2.5-7B-shaped model with random weights, 4-bit GPTQ by round-to-nearest (built on the
device as in ``bench/gpu_decode.py``), one engine, ``Session.generate_batch`` (traces
recorded as always). Each row's prompt is ``PROMPT`` random tokens; rows decode greedily,
EOS ignored. Decode tokens/s: ``B * NEW`` over the time of a batch to ``NEW + 1`` tokens less
the time of the same batch to 1 token (prefill and setup cancel), median of ``RUNS`` after a
warm-up (which captures the graphs). "batch 1, plain" is ``Session.generate`` (the batch-1
direct path). Steering: a random vector per row at layer ``4 + r % 20``, 0.5x that layer's
typical residual norm (shared: row 0's for every row). Peak memory (torch's peak reserved
plus what the device holds outside torch) against the plan plus the batch cache's rows.
Targets: batch 16 >= 8x batch 1; per-row distinct steering <= 10% against one shared.
Run: ``bash bench/gpu_session.sh batch`` (see docs/gpu.md). Writes ``$OUT/gpu_batch.json``.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from gpu_decode import build_hf, free_gpu, save_gptq

from max_jupyter.engines.exllamav2 import GiB, load_engines, measured_peak
from max_jupyter.session import Session
from max_jupyter.steering import SteeringVector

PROMPT, NEW, RUNS, BATCHES = 200, 64, 3, (1, 4, 16, 64)


def main() -> None:
    tokenizer_dir = Path(os.environ["MAX_JUPYTER_TOKENIZER"])
    out = Path(os.environ.get("OUT", tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="maxbatch-"))
    folder = save_gptq(build_hf("7B"), work / "qwen7b-gptq", tokenizer_dir)
    free_gpu()
    (engine,), plan = load_engines([("big", folder)], cache_tokens=1024)
    session = Session(engine, vectors={}, plan=plan)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (PROMPT,), generator=g).tolist() for _ in range(max(BATCHES))]
    session.generate(prompts[0], max_new_tokens=2)  # measures the residual norms
    norms = engine.residual_norms
    vectors = []
    for r in range(max(BATCHES)):
        layer = 4 + r % 20
        d = torch.randn(engine.identity.hidden_size, generator=g)
        vectors.append(SteeringVector({layer: d / d.norm() * 0.5 * norms[layer]}, engine.identity, f"r{r}"))

    def timed(call, new: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        call(new)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def decode_rate(b: int, call) -> dict:
        call(NEW + 1)  # warm-up: graphs captured
        spans = [timed(call, NEW + 1) - timed(call, 1) for _ in range(RUNS)]
        return {"tok_s": b * NEW / statistics.median(spans), "spans": spans}

    def batch(b: int, steering):
        return lambda new: session.generate_batch(prompts[:b], steering, max_new_tokens=new,
                                                  ignore_eos=True, progress=False)

    batch_cache = 64 * engine._row_bytes(PROMPT + NEW + 1)
    rows: dict[str, dict] = {}
    rows["batch 1, plain generate"] = decode_rate(1, lambda new: session.generate(
        prompts[0], max_new_tokens=new, ignore_eos=True))
    torch.cuda.reset_peak_memory_stats()
    for b in BATCHES:
        rows[f"batch {b}, unsteered"] = decode_rate(b, batch(b, None))
    peak = measured_peak()
    for b in (16, 64):
        rows[f"batch {b}, 1 config shared"] = decode_rate(b, batch(b, vectors[0]))
        rows[f"batch {b}, {b} configs (per row)"] = decode_rate(b, batch(b, vectors[:b]))
    session.close()

    base = rows["batch 1, unsteered"]["tok_s"]
    print(f"\n{torch.cuda.get_device_name()}, 7B-shaped 4-bit GPTQ, prompts of {PROMPT}, "
          f"{NEW} new tokens a row, median of {RUNS}")
    print(f"{'configuration':34} {'tok/s':>9} {'vs batch 1':>11}")
    for name, r in rows.items():
        print(f"{name:34} {r['tok_s']:9.1f} {r['tok_s'] / base:11.2f}")
    for b in (16, 64):
        shared, per_row = rows[f"batch {b}, 1 config shared"], rows[f"batch {b}, {b} configs (per row)"]
        print(f"batch {b}: per-row steering costs {1 - per_row['tok_s'] / shared['tok_s']:+.1%} "
              f"against one shared configuration")
    print(f"batch 16 / batch 1 = {rows['batch 16, unsteered']['tok_s'] / base:.2f} (target >= 8)")
    print(f"memory: plan {plan.total / GiB:.2f} GiB + batch cache of 64 rows {batch_cache / GiB:.2f} GiB; "
          f"measured peak {peak.total / GiB:.2f} GiB (torch {peak.torch / GiB:.2f} "
          f"+ outside torch {peak.outside_torch / GiB:.2f})")
    (out / "gpu_batch.json").write_text(json.dumps({
        "card": torch.cuda.get_device_name(), "commit": os.environ.get("MAX_JUPYTER_COMMIT", "unknown"),
        "rows": rows, "plan_gib": plan.total / GiB, "batch_cache_gib": batch_cache / GiB,
        "peak_gib": peak.total / GiB}, indent=1))


if __name__ == "__main__":
    main()
