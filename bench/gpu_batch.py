"""Batched decode on the ExLlamaV2 backend (a lent GPU): tokens/s at batch 1, 4, 16 and 64
against batch 1, and per-row distinct steering against one shared configuration.

A Qwen2.5-7B-shaped model with random weights, 4-bit GPTQ by round-to-nearest (built on the
device as in ``bench/gpu_decode.py``), one engine, ``Session.generate_batch`` (traces
recorded as always). Each row's prompt is ``PROMPT`` random tokens; rows decode greedily,
EOS ignored. Decode tokens/s: ``B * NEW`` over the time of a batch to ``NEW + 1`` tokens less
the time of the same batch to 1 token (prefill and setup cancel), median of ``RUNS`` after a
warm-up (which captures the graphs). "batch 1, plain" is ``Session.generate`` (the batch-1
direct path). Steering: a random vector per row at layer ``4 + r % 20`` at coefficient 0.5
(half that layer's typical residual norm; shared: row 0's for every row). "exllamav2 batch
loop": exllamav2's own batched ``model.forward`` over a batch ``ExLlamaV2Cache`` (what its
base generator runs; its paged dynamic generator needs flash-attn, absent on the lent
image), greedy on the device, the same prompts, timed the same way. Memory, per batch size
(torch's cached blocks emptied and its peak reset before each): the peak (torch's peak
reserved plus what the device holds outside torch) against the plan plus the rows'
``_row_bytes`` that ``check_batch`` holds against the free memory.
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
from gpu_decode import free_gpu, gptq_folder

from max_jupyter.engines.exllamav2 import GiB, drop_zero_gptq_biases, load_engines, measured_peak
from max_jupyter.session import Session
from max_jupyter.steering import Mix, SteeringVector

PROMPT, NEW, RUNS, BATCHES = 200, 64, 3, (1, 4, 16, 64)


def timed(call, new: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    call(new)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_rate(b: int, call) -> dict:
    """Decode tokens/s of ``call(new)`` over ``b`` rows: (time to ``NEW + 1`` tokens - time
    to 1), median of ``RUNS`` after a warm-up (which captures any graphs)."""
    call(NEW + 1)
    spans = [timed(call, NEW + 1) - timed(call, 1) for _ in range(RUNS)]
    return {"tok_s": b * NEW / statistics.median(spans), "spans": spans}


def exllamav2_batch_loop(folder: Path, prompts: list[list[int]], batches) -> dict[str, dict]:
    """exllamav2's batched ``model.forward`` (its modules over a batch cache, as its base
    generator runs them), greedy on the device: decode rate per batch size."""
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    config = ExLlamaV2Config(str(folder))
    config.max_seq_len, config.max_input_len, config.max_batch_size = 512, 256, max(batches)
    config.max_attention_size = 256 ** 2
    model = ExLlamaV2(config)
    drop_zero_gptq_biases(model)  # the random Qwen2 q/k/v biases are zero
    model.load()
    rows = {}
    for b in batches:
        cache = ExLlamaV2Cache(model, batch_size=b, max_seq_len=512)
        rows[f"batch {b}, exllamav2 batch loop"] = decode_rate(b, greedy_loop(model, cache, prompts[:b]))
        del cache
    model.unload()
    free_gpu()
    return rows


def greedy_loop(model, cache, prompts: list[list[int]]):
    """``run(new)``: the prompts through exllamav2's ``model.forward`` into ``cache``, then
    ``new`` greedy tokens a row (argmax on the device, the tokens back to the host)."""
    ids = torch.tensor(prompts)

    def run(new: int) -> None:
        cache.current_seq_len = 0
        model.forward(ids[:, :-1], cache, preprocess_only=True)
        token = model.forward(ids[:, -1:], cache)[:, -1].argmax(-1, keepdim=True).cpu()
        for _ in range(new - 1):
            token = model.forward(token, cache)[:, -1].argmax(-1, keepdim=True).cpu()

    return run


def main() -> None:
    tokenizer_dir = Path(os.environ["MAX_JUPYTER_TOKENIZER"])
    out = Path(os.environ.get("OUT", tempfile.gettempdir()))
    folder = gptq_folder("7B", tokenizer_dir, Path(tempfile.mkdtemp(prefix="maxbatch-")))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (PROMPT,), generator=g).tolist() for _ in range(max(BATCHES))]
    rows: dict[str, dict] = exllamav2_batch_loop(folder, prompts, (1, 16, 64))
    (engine,), plan = load_engines([("big", folder)], cache_tokens=1024)
    session = Session(engine, vectors={}, plan=plan)
    vectors = [Mix.of(SteeringVector({4 + r % 20: torch.randn(engine.identity.hidden_size, generator=g)},
                                     engine.identity, f"r{r}"), 0.5) for r in range(max(BATCHES))]

    def batch(b: int, steering):
        return lambda new: session.generate_batch(prompts[:b], steering, max_new_tokens=new,
                                                  ignore_eos=True, progress=False)

    rows["batch 1, plain generate"] = decode_rate(1, lambda new: session.generate(
        prompts[0], max_new_tokens=new, ignore_eos=True))
    memory = {}
    for b in BATCHES:
        free_gpu()
        torch.cuda.reset_peak_memory_stats()
        rows[f"batch {b}, unsteered"] = decode_rate(b, batch(b, None))
        peak = measured_peak()
        memory[b] = {"plan_gib": plan.total / GiB, "rows_gib": b * engine._row_bytes(PROMPT + NEW + 1) / GiB,
                     "peak_gib": peak.total / GiB, "torch_gib": peak.torch / GiB,
                     "outside_torch_gib": peak.outside_torch / GiB}
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
    for b in (16, 64):
        ours, theirs = rows[f"batch {b}, unsteered"], rows[f"batch {b}, exllamav2 batch loop"]
        print(f"batch {b}: ours / exllamav2's batch loop = {ours['tok_s'] / theirs['tok_s']:.2f}")
    print("| rows | plan GiB | + rows' _row_bytes | planned | measured peak (torch + outside) | peak <= planned |")
    print("|---:|---:|---:|---:|---:|---|")
    for b, m in memory.items():
        planned = m["plan_gib"] + m["rows_gib"]
        print(f"| {b} | {m['plan_gib']:.2f} | {m['rows_gib']:.2f} | {planned:.2f} | {m['peak_gib']:.2f} "
              f"({m['torch_gib']:.2f} + {m['outside_torch_gib']:.2f}) | {m['peak_gib'] <= planned} |")
    (out / "gpu_batch.json").write_text(json.dumps({
        "card": torch.cuda.get_device_name(), "commit": os.environ.get("MAX_JUPYTER_COMMIT", "unknown"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows, "memory": memory},
        indent=1))


if __name__ == "__main__":
    main()
