"""Batch-1 decode speed of the ExLlamaV2 backend on a lent GPU; prints one markdown table.

Weights are random, built on the device with the real shapes (no hub): a Qwen2.5-7B-shaped
model (fp16 for row e, then 4-bit GPTQ by round-to-nearest, ``testing.write_gptq_rtn``) and a
Qwen2.5-1.5B-shaped one (4-bit GPTQ, tied embeddings). Each row: a 1024-token prompt, then
512 greedy tokens (one warm-up run, then a timed run; decode time only).

  (a) exllamav2's own generator (ExLlamaV2DynamicGenerator, unpaged: no flash-attn), unsteered
  (b) our engine, unsteered;  (c) one vector at one layer, three vectors at three layers
  (d) big + small mirroring every token + a ProbeJudge-style projection of the small model's
      captured hidden state deciding the big model's steering (plain loop: both steps issued
      back to back so they overlap on the GPU, the big one speculatively with the last
      decision, re-run on a flip), both under a 16 GB ``max_vram_gb`` cap; and the
      CognitiveOrchestrator with a ProbeJudge (which overlaps the same way by itself)
  (e) HF transformers fp16 with forward hooks (one vector at one layer), same 7B shape

"bw frac" is the memory-bandwidth bound over the measured time: bytes of weights and KV
cache read per token over the card's measured device-to-device copy bandwidth.
Run: ``bash bench/gpu_session.sh bench`` (see docs/gpu.md).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from max_jupyter.engines.exllamav2 import (ExLlamaV2Engine, drop_zero_gptq_biases, load_pair,
                                           measure_model)
from max_jupyter.testing import write_gptq_rtn
from max_jupyter.orchestrator import CognitiveOrchestrator, ProbeJudge
from max_jupyter.steering import SteeringVector

PROMPT, NEW, CAP_GB = 1024, 512, 16.0
SHAPES = {  # Qwen2.5 configs (vocab, hidden, layers, heads, kv heads, intermediate, tied)
    "7B": dict(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True),
}


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * 2 ** 30 * 20 / (start.elapsed_time(end) / 1e3)


def build_hf(shape: str):
    """A random fp16 Qwen2 model of ``shape`` on the GPU."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6,
                         architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    with torch.no_grad():  # no logits for ids the (borrowed, 49152-token) tokenizer lacks,
        model.lm_head.weight[49152:] = 0  # as for a real model's padding rows
    return model


def save_gptq(model, folder: Path, tokenizer: Path) -> Path:
    write_gptq_rtn(model, folder)
    for f in tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def timed_decode(first_logits_fn, step_fn, n: int = NEW) -> float:
    """Seconds per token of ``n`` greedy steps after ``first_logits_fn()`` (a prefill)."""
    logits = first_logits_fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        logits = step_fn(int(logits.argmax()))
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def engine_row(engine, prompt, deltas=None) -> float:
    run = lambda: timed_decode(lambda: engine.prefill(prompt, deltas).logits,
                               lambda t: engine.step(t, deltas).logits)
    run()  # warm-up: captures the decode graphs of both cache buckets
    return run()


def exllamav2_generator_row(folder: Path, prompt) -> float:
    """exllamav2's own dynamic generator (its per-module CUDA graphs on), greedy."""
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    config = ExLlamaV2Config(str(folder))
    config.max_seq_len = 2048
    model = ExLlamaV2(config)
    drop_zero_gptq_biases(model)  # the random Qwen2 q/k/v biases are zero
    model.load()
    cache = ExLlamaV2Cache(model, max_seq_len=2048)
    generator = ExLlamaV2DynamicGenerator(model, cache, ExLlamaV2Tokenizer(config), paged=False)
    ids = torch.tensor([prompt])

    def run() -> float:
        job = ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=NEW, min_new_tokens=NEW,
                                  gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[])
        generator.enqueue(job)
        tokens, first = 0, None
        while generator.num_remaining_jobs():
            for result in generator.iterate():
                if result.get("stage") == "streaming" and "token_ids" in result:
                    tokens += result["token_ids"].shape[-1]
                    if first is None:
                        torch.cuda.synchronize()
                        first, tokens = time.perf_counter(), 0
        torch.cuda.synchronize()
        return (time.perf_counter() - first) / max(tokens, 1)

    run()
    seconds = run()
    model.unload()
    del generator, cache, model
    return seconds


def hf_row(model, prompt) -> float:
    """HF transformers fp16, a steering vector added by a forward hook at one layer."""
    from max_jupyter.engines import TransformersEngine
    from max_jupyter.tokenizer import Tokenizer

    engine = TransformersEngine(model, Tokenizer.from_folder(os.environ["MAX_JUPYTER_TOKENIZER"]))
    deltas = {14: torch.randn(model.config.hidden_size, device="cuda").half()}
    run = lambda n: timed_decode(lambda: engine.prefill(prompt, deltas).logits,
                                 lambda t: engine.step(t, deltas).logits, n)
    run(32)
    return run(NEW)


def pair_rows(big_dir: Path, small_dir: Path, prompt) -> tuple[float, int, float, str, dict]:
    """(d) under the 16 GB cap: the plain loop (``step`` below), then the
    CognitiveOrchestrator with a ProbeJudge. Returns (s/token, re-runs, orchestrator
    s/token, note, memory)."""
    torch.cuda.reset_peak_memory_stats()
    big, small, plan = load_pair(big_dir, small_dir, max_vram_gb=CAP_GB)
    layer, probe = 20, torch.randn(small.identity.hidden_size, device="cuda")
    probe /= probe.norm()
    steer = {14: torch.randn(big.identity.hidden_size, device="cuda").half()}
    scores: list[float] = []
    judge = {"on": False, "threshold": float("inf"), "hysteresis": 0.0, "reruns": 0}

    def step(token: int) -> torch.Tensor:
        """Big and small are fed ``token`` back to back (their GPU work overlaps); the big
        step runs speculatively with the judge's last decision and is re-run (rewind 1)
        when the probe of the small model's state after ``token`` flips it."""
        out = big.step(token, steer if judge["on"] else None)
        h = small.step(token, capture=[layer]).hidden[layer]  # [1, hidden_small]
        score = float(h[0].float() @ probe)  # ProbeJudge: scalar projection
        scores.append(score)
        on = score > judge["threshold"] or (judge["on"] and score > judge["threshold"] - judge["hysteresis"])
        if on != judge["on"]:
            judge["on"], judge["reruns"] = on, judge["reruns"] + 1
            big.rewind(1)
            out = big.step(token, steer if on else None)
        return out.logits

    def first() -> torch.Tensor:
        judge["on"], judge["reruns"] = False, 0
        small.prefill(prompt, capture=[layer])
        return big.prefill(prompt).logits

    timed_decode(first, step)  # warm-up; its scores set the judge: on above the 90th percentile
    ranked = sorted(scores)
    judge["threshold"] = ranked[int(0.9 * len(ranked))]
    judge["hysteresis"] = ranked[len(ranked) // 2] - ranked[len(ranked) // 4]
    timed_decode(first, step)  # warm-up with the judge set: captures the steered graphs too
    plain = timed_decode(first, step)
    reruns = judge["reruns"]
    probe_judge = ProbeJudge(SteeringVector({layer: probe.cpu()}, small.identity, "probe"),
                             threshold=judge["threshold"], hysteresis=judge["hysteresis"])
    vector = SteeringVector({14: steer[14].float().cpu()}, big.identity, "steer")
    orch = CognitiveOrchestrator(big, small, probe_judge, vector)  # overlap: automatic
    stamps: list[float] = []  # host time of each step event: decode only, as timed_decode
    for _ in range(2):
        stamps.clear()
        result = orch.generate(prompt, max_new_tokens=NEW + 1, ignore_eos=True,
                               on_event=lambda event: stamps.append(time.perf_counter()))
    orch_time = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    note = (f"{NEW} steps after the prefills, overlap {'on' if orch.overlap else 'off'}, "
            f"{result.speculation_misses} speculation misses")
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    memory = {"plan": plan, "torch_peak_reserved": torch.cuda.max_memory_reserved(),
              "device_used": total - free}
    big.unload()
    small.unload()
    return plain, reruns, orch_time, note, memory


def main() -> None:
    tokenizer = Path(os.environ["MAX_JUPYTER_TOKENIZER"])
    out = Path(os.environ.get("OUT", tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="maxbench-"))
    torch.backends.cuda.enable_cudnn_sdp(False)  # row (a)'s SDPA: cuDNN re-plans per KV length
    card = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    prompt = torch.randint(0, 49152, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    avg_ctx = PROMPT + NEW // 2
    rows: list[tuple[str, float, float]] = []  # (label, s/token, bytes/token)

    hf7 = build_hf("7B")
    hf_bytes = sum(p.numel() * 2 for n, p in hf7.named_parameters() if "embed_tokens" not in n)
    kv7 = 28 * 2 * 4 * 128 * 2  # bytes per cached position, 7B shape
    kv15 = 28 * 2 * 2 * 128 * 2
    rows.append(("(e) HF transformers fp16 + forward hook, 1 vector", hf_row(hf7, prompt),
                 hf_bytes + kv7 * avg_ctx))
    big_dir = save_gptq(hf7, work / "qwen7b-gptq", tokenizer)
    del hf7
    gc.collect()
    torch.cuda.empty_cache()
    hf15 = build_hf("1.5B")
    small_dir = save_gptq(hf15, work / "qwen1.5b-gptq", tokenizer)
    del hf15
    gc.collect()
    torch.cuda.empty_cache()
    big_bytes = measure_model("big", big_dir)[0].weights + kv7 * avg_ctx
    small_bytes = measure_model("small", small_dir)[0].weights + kv15 * avg_ctx

    rows.insert(0, ("(a) exllamav2 dynamic generator, unsteered",
                    exllamav2_generator_row(big_dir, prompt), big_bytes))
    engine = ExLlamaV2Engine.load(big_dir, cache_tokens=2048)
    hidden = engine.identity.hidden_size
    vec = lambda: torch.randn(hidden, device="cuda").half()
    rows.insert(1, ("(b) ours, unsteered", engine_row(engine, prompt), big_bytes))
    rows.insert(2, ("(c) ours, 1 vector @ layer 14", engine_row(engine, prompt, {14: vec()}), big_bytes))
    rows.insert(3, ("(c) ours, 3 vectors @ layers 7, 14, 21",
                    engine_row(engine, prompt, {7: vec(), 14: vec(), 21: vec()}), big_bytes))
    engine.unload()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    plain, reruns, orch, note, memory = pair_rows(big_dir, small_dir, prompt)
    rows.insert(4, (f"(d) big + mirrored small + probe judge, plain loop, 16 GB cap "
                    f"({reruns} re-runs)", plain, big_bytes + small_bytes))
    rows.insert(5, (f"(d) CognitiveOrchestrator + ProbeJudge ({note})", orch,
                    big_bytes + small_bytes))

    base = rows[0][1]
    lines = [f"card: {card}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read+write); batch 1, "
             f"{PROMPT}-token prompt, {NEW} new tokens; random weights built on the device",
             "", "| row | ms/token | tok/s | vs (a) | bw frac |", "|---|---:|---:|---:|---:|"]
    for label, seconds, nbytes in rows:
        lines.append(f"| {label} | {seconds * 1e3:.2f} | {1 / seconds:.1f} | {base / seconds:.2f} | "
                     f"{nbytes / bandwidth / seconds:.1%} |")
    plan = memory["plan"]
    lines += ["", f"two-model set-up under max_vram_gb={CAP_GB}: torch peak reserved "
              f"{memory['torch_peak_reserved'] / 2**30:.2f} GiB, device used (incl. CUDA context) "
              f"{memory['device_used'] / 2**30:.2f} GiB", "", plan.table(memory["device_used"])]
    table = "\n".join(lines)
    print(table)
    (out / "bench_table.md").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps(
        {"card": card, "bandwidth": bandwidth, "rows": rows, "note": note}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
