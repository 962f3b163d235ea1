"""Batch-1 decode speed of the ExLlamaV3 backend against exllamav3 itself, on a lent GPU.

Weights: random EXL3 tensors written directly with the real Qwen2.5-7B and 1.5B layer
shapes (``max_jupyter.testing.write_random_exl3``: random trellis codes are valid EXL3
encodings, so the kernels do the work of a converted model; exllamav3's converter took 78 s
for a 0.5B-shaped model on an H100, a 7B takes far longer than a device call). The
vocabulary is the tokenizer's (49152, ``$MAX_JUPYTER_TOKENIZER``) instead of Qwen's 152064,
so the head is 3.1x smaller than the real one. Weights 4 bits, head 6.

Every row decodes greedily from the same ``PROMPT``-token prompt; ms/token is the median
of ``RUNS`` runs after a warm-up, over ``NEW`` tokens (forward and a greedy pick on the host):
  (a) exllamav3's ``Generator`` (ArgmaxSampler; the prefill removed by timing ``NEW + 32``
      and ``32`` new tokens and dividing the difference) and its ``Model.forward`` loop
  (b) ours, unsteered; (c) ours with 1 and 3 steering vectors
  (b') ours calling the backend's pass directly (``_forward``: no contract checks), to
      show where our time beyond exllamav3's goes
  (d) the 7B- and 1.5B-shaped pair under ``max_vram_gb=16``, the small model stepping
      the same token after the big one (mirroring), with the measured peak memory; and
      the same pair in ``CognitiveOrchestrator`` with a ``ProbeJudge`` reading the small
      model's middle layer and steering the big one (the judge flips at the scores' 90th
      percentile, so it switches several times a run)
  (e) our ExLlamaV2 backend on the same 7B layer shapes and vocabulary, 4-bit GPTQ (group
      128, fp16 head; ``bench/gpu_decode.py``'s round-to-nearest weights), same loop
"bw frac": bytes read per token (GPU weights + K/V at the mean context) over the measured
device-to-device copy bandwidth, divided by the measured time.
Writes ``$OUT/gpu_exl3.json``; ``python bench/gpu_exl3.py --table FILE`` prints its tables;
``--write DIR`` only writes the model folders (``EXL3_BENCH_DIR=DIR`` then reuses them).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpu_decode import build_hf, copy_bandwidth, free_gpu, save_gptq

PROMPT, NEW, RUNS, CAP_GB, VOCAB = 1024, 128, 3, 16.0, 49152
SHAPES = {  # Qwen2.5 layer shapes (hidden, layers, heads, kv heads, intermediate); own heads
    "7B": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960),
}


def timed(run, runs: int = RUNS) -> list[float]:
    """Seconds of ``run()`` per call: one warm-up, then ``runs`` timed calls."""
    run()
    out = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def ours(engine, prompt: list[int], deltas: dict | None = None, checked: bool = True):
    """A ``run`` of our decode loop (``checked=False``: through ``engine._forward``, what
    ``step`` runs after its checks), recording ``run.decode``."""
    def step(tok: int):
        return engine.step(tok, deltas) if checked else engine._forward([tok], {}, frozenset())

    def run():
        logits = engine.prefill(prompt, deltas).logits
        torch.cuda.synchronize()
        t = time.perf_counter()
        tok = int(logits.argmax())
        for _ in range(NEW):
            tok = int(step(tok).logits.argmax())
        run.decode = time.perf_counter() - t
    return run


def decode_ms(run) -> list[float]:
    """ms/token of the decode part of ``run`` (which records ``run.decode``), per timed run."""
    out = []
    for _ in range(RUNS + 1):
        run()
        out.append(run.decode / NEW * 1e3)
    return out[1:]


def row(label: str, ms: list[float], nbytes: int, bw: float, base: float | None = None) -> dict:
    med = statistics.median(ms)
    return dict(row=label, ms=med, min=min(ms), max=max(ms), tok_s=1e3 / med,
                vs_a=(base / med if base else 1.0), bw_frac=nbytes / bw / (med / 1e3))


def gpu_bytes(folder: Path, shape: dict) -> int:
    from max_jupyter.engines.exllamav3.folder import tensor_bytes

    sizes = tensor_bytes(folder)
    kv = 2 * shape["num_key_value_heads"] * (shape["hidden_size"] // shape["num_attention_heads"]) * 2
    mean_ctx = PROMPT + NEW // 2
    return (sum(b for k, b in sizes.items() if not k.startswith("model.embed_tokens"))
            + shape["num_hidden_layers"] * kv * mean_ctx)


def bench_single(folder: Path, shape: dict, bw: float) -> list[dict]:
    from exllamav3 import Cache, Config, Generator, Model
    from exllamav3 import Tokenizer as X3Tokenizer
    from exllamav3.generator.sampler import ArgmaxSampler

    from max_jupyter.engines.exllamav3 import ExLlamaV3Engine

    nbytes = gpu_bytes(folder, shape)
    gen_ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    model = Model.from_config(Config.from_directory(str(folder)))
    cache = Cache(model, max_num_tokens=4096)
    model.load(progressbar=False)
    tok = X3Tokenizer.from_config(model.config)
    generator = Generator(model=model, cache=cache, tokenizer=tok)
    prompt_text = tok.decode(gen_ids)[0] if isinstance(tok.decode(gen_ids), list) else tok.decode(gen_ids)

    def gen(n):
        return lambda: generator.generate(prompt=prompt_text, min_new_tokens=n, max_new_tokens=n,
                                          sampler=ArgmaxSampler(), stop_conditions=[])
    long, short = timed(gen(NEW + 32)), timed(gen(32))
    gen_ms = [(a - b) / NEW * 1e3 for a, b in zip(long, short)]
    rows = [row("(a) exllamav3 1.6.5 Generator, ArgmaxSampler", gen_ms, nbytes, bw)]
    base = rows[0]["ms"]

    def forward_loop():
        params = {"attn_mode": "flash_attn", "cache": cache, "past_len": 0, "batch_shape": (1, 4096),
                  "last_tokens_only": 1}
        nxt = model.forward(gen_ids, params)[:, -1:].argmax(-1).cpu()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(NEW):
            p = {"attn_mode": "flash_attn", "cache": cache, "past_len": PROMPT + i, "batch_shape": (1, 4096)}
            nxt = model.forward(nxt, p)[:, -1:].argmax(-1).cpu()
        forward_loop.decode = time.perf_counter() - t
    rows.append(row("(a) exllamav3 Model.forward loop, greedy on the host", decode_ms(forward_loop),
                    nbytes, bw, base))
    generator.close()
    model.unload()
    generator = model = cache = None  # free them before our engine loads
    torch.cuda.empty_cache()

    engine = ExLlamaV3Engine.load(folder, cache_tokens=4096)
    prompt = gen_ids[0].tolist()
    n = shape["num_hidden_layers"]
    engine.prefill(prompt[:8])  # measures the typical residual norms (engines/residual.py)
    norms = engine.residual_norms

    def vec(i):
        d = torch.randn(shape["hidden_size"], device="cuda")
        return d * (norms[i] / d.norm())  # a vector as large as the residual there
    rows.append(row("(b) ours, unsteered", decode_ms(ours(engine, prompt)), nbytes, bw, base))
    rows.append(row("(b') ours, the backend's pass without the contract's checks (_forward)",
                    decode_ms(ours(engine, prompt, checked=False)), nbytes, bw, base))
    one = {n // 2: vec(n // 2)}
    rows.append(row(f"(c) ours, 1 vector @ layer {n // 2}", decode_ms(ours(engine, prompt, one)),
                    nbytes, bw, base))
    three = {i: vec(i) for i in (n // 4, n // 2, 3 * n // 4)}
    rows.append(row(f"(c) ours, 3 vectors @ layers {', '.join(map(str, three))}",
                    decode_ms(ours(engine, prompt, three)), nbytes, bw, base))
    engine.unload()
    torch.cuda.empty_cache()
    return rows


def bench_pair(big: Path, small: Path, shapes: tuple[dict, dict], bw: float, base: float) -> tuple[dict, str]:
    from max_jupyter.engines.exllamav2 import measured_peak
    from max_jupyter.engines.exllamav3 import load_pair

    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    b, s, plan = load_pair(big, small, max_vram_gb=CAP_GB)
    prompt = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()

    def run():
        logits = b.prefill(prompt).logits
        s.prefill(prompt)
        torch.cuda.synchronize()
        t = time.perf_counter()
        tok = int(logits.argmax())
        for _ in range(NEW):
            s.step(tok, capture={s.identity.num_layers // 2})
            tok = int(b.step(tok).logits.argmax())
        run.decode = time.perf_counter() - t
    ms = decode_ms(run)
    judged, misses = probe_judged(b, s, prompt)
    peak = measured_peak(held)
    nbytes = gpu_bytes(big, shapes[0]) + gpu_bytes(small, shapes[1])
    r = row(f"(d) 7B + mirrored 1.5B (captured mid layer), max_vram_gb={CAP_GB:g}, "
            f"plan {plan.total / 2 ** 30:.2f} GiB, measured peak {peak.total / 2 ** 30:.2f} GiB",
            ms, nbytes, bw, base)
    r |= dict(planned_gib=plan.total / 2 ** 30, peak_gib=peak.total / 2 ** 30,
              cache_tokens=plan.cache_tokens)
    j = row(f"(d) the pair in CognitiveOrchestrator + ProbeJudge (judge flips per run: "
            f"{', '.join(map(str, misses))}), same cap; peak above covers both", judged, nbytes, bw, base)
    table = plan.table(peak)
    b.unload(), s.unload()
    torch.cuda.set_per_process_memory_fraction(1.0)
    return [r, j], table


def probe_judged(big, small, prompt: list[int]) -> tuple[list[float], list[int]]:
    """ms/token of the orchestrator with a ProbeJudge on the small model's middle layer
    steering the big one (threshold at the 90th percentile of a first run's scores), per
    timed run, and the judge's flips per run."""
    from max_jupyter.orchestrator import CognitiveOrchestrator, ProbeJudge
    from max_jupyter.steering import SteeringVector

    layer, g = small.identity.num_layers // 2, torch.Generator().manual_seed(2)
    probe = SteeringVector({layer: torch.randn(small.identity.hidden_size, generator=g)}, small.identity, "probe")
    steer = SteeringVector({big.identity.num_layers // 2: torch.randn(big.identity.hidden_size, generator=g)},
                           big.identity, "steer")
    scores: list[float] = []
    first = CognitiveOrchestrator(big, small, judges=ProbeJudge(probe, threshold=float("inf")), mixes=steer)
    first.generate(prompt, max_new_tokens=NEW, ignore_eos=True,
                   on_event=lambda e: e.record and scores.extend(e.record.scores.values()))
    ranked = sorted(scores)
    judge = ProbeJudge(probe, threshold=ranked[int(0.9 * len(ranked))],
                       hysteresis=ranked[len(ranked) // 2] - ranked[len(ranked) // 4])
    orch = CognitiveOrchestrator(big, small, judges=judge, mixes=steer)
    ms, flips = [], []
    for i in range(RUNS + 1):
        stamps: list[float] = []  # one per step, after its token was picked and decoded
        result = orch.generate(prompt, max_new_tokens=NEW + 1, ignore_eos=True,
                               on_event=lambda e, stamps=stamps: e.record and stamps.append(time.perf_counter()))
        if i:  # the first run is the warm-up
            ms.append((stamps[-1] - stamps[0]) / NEW * 1e3)
            on = [bool(rec.mixes_on) for rec in result.steps]
            flips.append(sum(a != b for a, b in zip(on, on[1:])))
    return ms, flips


def bench_exllamav2(bw: float, base: float) -> dict:
    """Row (e): our ExLlamaV2 backend on a 4-bit GPTQ model of the 7B layer shapes and vocabulary."""

    from max_jupyter.engines.exllamav2 import ExLlamaV2Engine, measure_model

    folder = save_gptq(build_hf("7B", VOCAB), Path(tempfile.mkdtemp(prefix="gptq-")) / "7b",
                       Path(os.environ["MAX_JUPYTER_TOKENIZER"]))
    free_gpu()
    memory = measure_model("big", folder)[0]
    engine = ExLlamaV2Engine.load(folder, cache_tokens=4096)
    prompt = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    nbytes = memory.weights + memory.cache_per_token * (PROMPT + NEW // 2)
    r = row("(e) ours on ExLlamaV2 0.3.2, 4-bit GPTQ (group 128, fp16 head), same shapes, its decode graphs",
            decode_ms(ours(engine, prompt)), nbytes, bw, base)
    engine.unload()
    torch.cuda.set_per_process_memory_fraction(1.0)
    free_gpu()
    return r


def render(result: dict) -> str:
    lines = [f"Measured {result['when']} at commit `{result['commit']}` on {result['card']} "
             f"(torch {result['torch']}, exllamav3 {result['exllamav3']}), copy bandwidth "
             f"{result['bandwidth_gbs']:.0f} GB/s (read + write); batch 1, {PROMPT}-token prompt, "
             f"{NEW} greedy tokens, median of {RUNS} runs after a warm-up; random EXL3 weights "
             f"(4 bits, head 6), Qwen2.5 layer shapes, vocabulary {VOCAB}.", ""]
    for shape, rows in result["rows"].items():
        lines += [f"**{shape}**", "", "| row | ms/token | runs (min-max) | tok/s | vs (a) | bw frac |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['row']} | {r['ms']:.2f} | {r['min']:.2f}-{r['max']:.2f} | {r['tok_s']:.1f} "
                  f"| {r['vs_a']:.2f} | {100 * r['bw_frac']:.1f}% |" for r in rows]
        lines.append("")
    if result.get("pair_plan"):
        lines += ["Memory of row (d):", "", result["pair_plan"]]
    return "\n".join(lines)


def write_folders(root: Path) -> dict[str, Path]:
    """The benchmark's random EXL3 folders under ``root`` (written once: kept if present)."""
    from max_jupyter.testing import write_random_exl3

    folders = {}
    for seed, (name, shape) in enumerate(SHAPES.items()):
        folders[name] = root / name
        if not (folders[name] / "config.json").is_file():
            t = time.time()
            write_random_exl3(folders[name], shape, os.environ["MAX_JUPYTER_TOKENIZER"], VOCAB, seed)
            print(f"wrote {name} in {time.time() - t:.1f}s", flush=True)
    return folders


def main() -> None:
    """Rows (a)-(c) on the 7B shape, then (d), then (a)-(c) on the 1.5B shape while the
    ``BENCH_SECONDS`` budget lasts; the JSON is rewritten after each part."""
    import exllamav3

    out = Path(os.environ.get("OUT", "/tmp"))
    folders = write_folders(Path(os.environ.get("EXL3_BENCH_DIR") or tempfile.mkdtemp(prefix="exl3-")))
    budget = float(os.environ.get("BENCH_SECONDS", "240"))
    start = time.time()
    bw = copy_bandwidth()
    result = dict(when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  commit=os.environ.get("MAX_JUPYTER_COMMIT", "unknown"),
                  card=torch.cuda.get_device_name(), torch=torch.__version__,
                  exllamav3=getattr(exllamav3, "__version__", "1.6.5"), bandwidth_gbs=bw / 1e9, rows={})

    def save():
        (out / "gpu_exl3.json").write_text(json.dumps(result, indent=1))
        print(render(result), flush=True)
    result["rows"]["7B"] = bench_single(folders["7B"], SHAPES["7B"], bw)
    save()
    base = result["rows"]["7B"][0]["ms"]
    pair, table = bench_pair(folders["7B"], folders["1.5B"], (SHAPES["7B"], SHAPES["1.5B"]), bw, base)
    result["rows"]["7B"] += pair
    result["pair_plan"] = table
    save()
    result["rows"]["7B"].append(bench_exllamav2(bw, base))
    save()
    if time.time() - start < budget:
        result["rows"]["1.5B"] = bench_single(folders["1.5B"], SHAPES["1.5B"], bw)
        save()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(render(json.loads(Path(sys.argv[2]).read_text())))
    elif len(sys.argv) == 3 and sys.argv[1] == "--write":
        write_folders(Path(sys.argv[2]))
    else:
        main()
