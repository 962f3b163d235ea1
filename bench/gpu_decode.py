"""Batch-1 decode speed of the ExLlamaV2 backend against exllamav2 itself, on a lent GPU.

Weights are random, built on the device with the real shapes (no hub): a Qwen2.5-7B-shaped
model (fp16 for row e, then 4-bit GPTQ by round-to-nearest, ``testing.write_gptq_rtn``) and
a Qwen2.5-1.5B-shaped one (4-bit GPTQ, tied embeddings). Every row decodes the same
1024-token prompt greedily to ``NEW + 1`` tokens and is timed over the same span, from the
first new token on the host to the last: ``NEW`` tokens, each with one forward (plus any
ahead miss), a greedy pick on the host and incremental detokenisation. One warm-up,
then the median of ``RUNS`` runs.

  (a) exllamav2's own dynamic generator at the best configuration this box allows (paged
      only with flash-attn >= 2.5.7; its per-module CUDA graphs on), unsteered, and
      exllamav2's ``model.forward`` loop (the same modules, our greedy pick and decoder)
  (b) our engine in the plain generation loop, unsteered; (c) one vector, three vectors
  (d) big + small mirroring every token + a probe of the small model's captured state
      deciding the big model's steering, under a 16 GB ``max_vram_gb`` cap: a hand-written
      loop (both steps issued back to back, the big one ahead with the last
      decision, rewound and run again when the decision flips) and CognitiveOrchestrator
      with a ProbeJudge, which does the same by itself; both count those extra big
      forwards as ahead misses
  (e) HF transformers fp16 with a forward hook (one vector), same 7B shape, plain loop

"bw frac": bytes read per token (weights on the GPU, KV cache at the mean context, and the
big model's weights again per ahead miss), all derived from the model shapes, over
the measured device-to-device copy bandwidth, divided by the measured time.
Writes ``$OUT/gpu_decode.json`` (stamped with ``$MAX_JUPYTER_COMMIT`` and the card) for
``bench/gpu_tables.py``. Run: ``bash bench/gpu_session.sh bench`` (see docs/gpu.md).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from gpu_tables import render_memory, render_speed

from max_jupyter.engines.exllamav2 import (
    ExLlamaV2Engine,
    drop_zero_gptq_biases,
    load_pair,
    measure_model,
    measured_peak,
)
from max_jupyter.orchestrator import CognitiveOrchestrator, ProbeJudge, generate
from max_jupyter.steering import SteeringVector
from max_jupyter.testing import write_gptq_rtn
from max_jupyter.tokenizer import Tokenizer

PROMPT, NEW, RUNS, CAP_GB = 1024, 512, 3, 16.0
SHAPES = {  # Qwen2.5 configs (vocab, hidden, layers, heads, kv heads, intermediate, tied)
    "7B": dict(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True),
}
MEAN_CONTEXT = PROMPT + NEW // 2  # cached positions read by the average timed step


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


def kv_bytes_per_token(shape: dict) -> int:
    """fp16 K and V of every layer for one cached position."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * head_dim * 2


def build_hf(shape: str, vocab_size: int | None = None):
    """A random fp16 Qwen2 model of ``shape`` on the GPU (``vocab_size``: instead of Qwen's)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**(SHAPES[shape] | ({"vocab_size": vocab_size} if vocab_size else {})),
                         max_position_embeddings=32768, rope_theta=1e6,
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


def gptq_folder(shape: str, tokenizer: Path, root: Path) -> Path:
    """The random ``shape`` model as 4-bit GPTQ under ``$GPTQ_BENCH_DIR`` (written once, kept
    for the next bench in the same call) or else under ``root``."""
    folder = Path(os.environ.get("GPTQ_BENCH_DIR") or root) / f"qwen{shape.lower()}-gptq"
    if not (folder / "config.json").is_file():
        save_gptq(build_hf(shape), folder, tokenizer)
        free_gpu()
    return folder


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def repeat(run: Callable[[], tuple[float, int]], new: int = NEW, runs: int = RUNS) -> dict:
    """One warm-up, then ``runs`` timed runs: each returns (seconds over the span of ``new``
    tokens, misses)."""
    run()
    times, misses = zip(*(run() for _ in range(runs)))
    return {"ms": [1e3 * t / new for t in times], "misses": list(misses)}


def plain_run(engine, ids: list[int], steering=None, new: int = NEW) -> tuple[float, int]:
    """Our plain loop (greedy, detokenising, EOS ignored) to ``new + 1`` tokens; the span
    starts at the first ``step`` call, right after the first token was picked and decoded."""
    start: list[float] = []
    real = engine.step

    def step(*args, **kwargs):
        if not start:
            start.append(time.perf_counter())
        return real(*args, **kwargs)

    engine.step = step  # instance attribute: the loop calls engine.step once per token
    try:
        result = generate(engine, ids, max_new_tokens=new + 1, ignore_eos=True, steering=steering)
    finally:
        del engine.step
    assert len(result.token_ids) == new + 1
    return time.perf_counter() - start[0], 0


def exllamav2_generator(folder: Path, ids: list[int], new: int = NEW) -> tuple[str, dict, Callable, tuple]:
    """exllamav2's dynamic generator at its best configuration here, timed over ``new``
    tokens after the first: (label, facts, run, (model, cache, generator))."""
    import exllamav2
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer, attn
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    config = ExLlamaV2Config(str(folder))
    config.max_seq_len = 2048
    model = ExLlamaV2(config)
    drop_zero_gptq_biases(model)  # the random Qwen2 q/k/v biases are zero
    model.load()
    cache = ExLlamaV2Cache(model, max_seq_len=2048)
    paged = bool(attn.has_flash_attn_with_paged)
    generator = ExLlamaV2DynamicGenerator(model, cache, ExLlamaV2Tokenizer(config), paged=paged)
    backend = "flash-attn" if attn.has_flash_attn else "xformers" if attn.has_xformers else "torch SDPA"
    label = (f"(a) exllamav2 {exllamav2.__version__} dynamic generator, "
             f"{'paged' if paged else 'unpaged'}, attention {backend}, its CUDA graphs on")
    facts = {"paged": paged, "flash_attn": bool(attn.has_flash_attn),
             "xformers": bool(attn.has_xformers), "version": exllamav2.__version__}

    def run() -> tuple[float, int]:
        job = ExLlamaV2DynamicJob(input_ids=torch.tensor([ids]), max_new_tokens=new + 1,
                                  min_new_tokens=new + 1, stop_conditions=[],
                                  gen_settings=ExLlamaV2Sampler.Settings.greedy())
        generator.enqueue(job)
        stamps: list[float] = []  # one per streamed token, its text decoded
        while generator.num_remaining_jobs():
            for result in generator.iterate():
                if result.get("stage") == "streaming" and "token_ids" in result:
                    stamps += [time.perf_counter()] * result["token_ids"].shape[-1]
        assert len(stamps) == new + 1, len(stamps)
        return stamps[-1] - stamps[0], 0

    return label, facts, run, (model, cache, generator)


def exllamav2_forward_loop(model, cache, tokenizer: Tokenizer, ids: list[int]) -> Callable:
    """exllamav2's ``model.forward`` one token at a time (its modules and CUDA graphs), with
    our greedy pick and stream decoder: the work per token of the other rows."""
    def run() -> tuple[float, int]:
        cache.current_seq_len = 0
        decoder = tokenizer.stream_decoder()
        model.forward(torch.tensor([ids[:-1]]), cache, preprocess_only=True)
        token = int(model.forward(torch.tensor([ids[-1:]]), cache)[0, -1].argmax())
        decoder.feed(token)
        start = time.perf_counter()
        for _ in range(NEW):
            token = int(model.forward(torch.tensor([[token]]), cache)[0, -1].argmax())
            decoder.feed(token)
        return time.perf_counter() - start, 0

    return run


def pair_rows(big_dir: Path, small_dir: Path, ids: list[int]) -> tuple[dict, dict, dict]:
    """(d) under the 16 GB cap: the hand-written loop, then the CognitiveOrchestrator with a
    ProbeJudge; returns their results and the memory (plan, measured peak)."""
    held = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    big, small, plan = load_pair(big_dir, small_dir, max_vram_gb=CAP_GB)
    layer = 20
    probe = torch.randn(small.identity.hidden_size, device="cuda")
    probe /= probe.norm()
    steer = {14: torch.randn(big.identity.hidden_size, device="cuda").half()}
    judge = {"threshold": float("inf"), "hysteresis": 0.0}
    scores: list[float] = []

    def hand_loop() -> tuple[float, int]:
        """Both models fed each token back to back (their GPU work overlaps); the big step
        runs with the last decision and is rewound and run again when the probe of the small
        model's state after that token flips it (a ahead miss)."""
        decoder, on, misses = big.tokenizer.stream_decoder(), False, 0
        small.prefill(ids, capture=[layer])
        token = int(big.prefill(ids).logits.argmax())
        decoder.feed(token)
        start = time.perf_counter()
        for _ in range(NEW):
            out = big.step(token, steer if on else None)
            h = small.step(token, capture=[layer]).hidden[layer]  # [1, hidden_small]
            score = float(h[0].float() @ probe)
            scores.append(score)
            flip = (score < judge["threshold"] - judge["hysteresis"]) if on else (score > judge["threshold"])
            if flip:
                on, misses = not on, misses + 1
                big.rewind(1)
                out = big.step(token, steer if on else None)
            token = int(out.logits.argmax())
            decoder.feed(token)
        return time.perf_counter() - start, misses

    hand_loop()  # its scores set the judge: on above the 90th percentile
    ranked = sorted(scores)
    judge["threshold"] = ranked[int(0.9 * len(ranked))]
    judge["hysteresis"] = ranked[len(ranked) // 2] - ranked[len(ranked) // 4]
    hand = repeat(hand_loop)
    probe_judge = ProbeJudge(SteeringVector({layer: probe.cpu()}, small.identity, "probe"),
                             threshold=judge["threshold"], hysteresis=judge["hysteresis"])
    vector = SteeringVector({14: steer[14].float().cpu()}, big.identity, "steer")
    orch = CognitiveOrchestrator(big, small, judges=probe_judge, mixes=vector)  # overlap: auto

    def orchestrated() -> tuple[float, int]:
        stamps: list[float] = []  # one per step, after its token was picked and decoded
        result = orch.generate(ids, max_new_tokens=NEW + 1, ignore_eos=True,
                               on_event=lambda e: e.record and stamps.append(time.perf_counter()))
        assert len(stamps) == NEW + 1
        return stamps[-1] - stamps[0], result.ahead_misses

    orchestrator = repeat(orchestrated)
    orchestrator["overlap"] = orch.overlap
    torch.cuda.synchronize()
    peak = measured_peak(held)
    memory = {"cap_gb": CAP_GB, "parts": plan.parts(), "planned": plan.total, "budget": plan.budget,
              "cache_tokens": plan.cache_tokens, "table": plan.table(peak),
              "measured": {"torch": peak.torch, "outside_torch": peak.outside_torch,
                           "total": peak.total},
              "host_embeddings": sum(m.host_embedding for m in plan.models)}
    big.unload()
    small.unload()
    torch.cuda.set_per_process_memory_fraction(1.0)
    return hand, orchestrator, memory


def row(label: str, result: dict, weights: int, kv_per_token: int, miss_bytes: int = 0) -> dict:
    """A table row: median ms/token, runs, and bytes read per token (shapes, not literals)."""
    misses = statistics.median(result["misses"])
    return {"label": label, "ms": statistics.median(result["ms"]), "runs_ms": result["ms"],
            "tokens": NEW, "misses": result["misses"] if any(result["misses"]) else None,
            "bytes_per_token": weights + kv_per_token * MEAN_CONTEXT + miss_bytes * misses / NEW}


def stamp(card: str, bandwidth: float, exl: dict) -> dict:
    commit = os.environ.get("MAX_JUPYTER_COMMIT") or subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return {"commit": commit or "unknown", "card": card, "torch": torch.__version__,
            "exllamav2": exl, "bandwidth": bandwidth, "prompt": PROMPT, "new": NEW, "runs": RUNS,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    tokenizer_dir = Path(os.environ["MAX_JUPYTER_TOKENIZER"])
    tokenizer = Tokenizer.from_folder(tokenizer_dir)
    out = Path(os.environ.get("OUT", tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="maxbench-"))
    torch.backends.cuda.enable_cudnn_sdp(False)  # SDPA in every row: cuDNN re-plans per KV length
    card, bandwidth = torch.cuda.get_device_name(), copy_bandwidth()
    ids = torch.randint(0, 49152, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    rows: dict[str, dict] = {}

    hf7 = build_hf("7B")
    from max_jupyter.engines import TransformersEngine
    hf = TransformersEngine(hf7, tokenizer)
    hf_weights = sum(p.numel() * p.element_size() for n, p in hf7.named_parameters()
                     if "embed_tokens" not in n)
    vec14 = SteeringVector({14: torch.randn(SHAPES["7B"]["hidden_size"])}, hf.identity, "v14")
    rows["e"] = row("(e) HF transformers fp16 + forward hook, 1 vector @ layer 14",
                    repeat(lambda: plain_run(hf, ids, vec14)), hf_weights,
                    kv_bytes_per_token(SHAPES["7B"]))
    del hf
    big_dir = save_gptq(hf7, work / "qwen7b-gptq", tokenizer_dir)
    del hf7
    free_gpu()
    small_dir = save_gptq(build_hf("1.5B"), work / "qwen1.5b-gptq", tokenizer_dir)
    free_gpu()
    big_mem, small_mem = measure_model("big", big_dir)[0], measure_model("small", small_dir)[0]
    big_kv = (big_mem.weights, big_mem.cache_per_token)

    label, exl_facts, run, held = exllamav2_generator(big_dir, ids)
    rows["a"] = row(label, repeat(run), *big_kv)
    rows["a2"] = row("(a) exllamav2 model.forward loop, same modules and graphs",
                     repeat(exllamav2_forward_loop(held[0], held[1], tokenizer, ids)), *big_kv)
    held[0].unload()
    del run, held
    free_gpu()

    engine = ExLlamaV2Engine.load(big_dir, cache_tokens=2048)
    vector = lambda layers: SteeringVector({i: torch.randn(engine.identity.hidden_size)
                                            for i in layers}, engine.identity, "v")
    rows["b"] = row("(b) ours, plain loop, unsteered", repeat(lambda: plain_run(engine, ids)), *big_kv)
    one, three = vector([14]), vector([7, 14, 21])
    rows["c1"] = row("(c) ours, 1 vector @ layer 14", repeat(lambda: plain_run(engine, ids, one)),
                     *big_kv)
    rows["c3"] = row("(c) ours, 3 vectors @ layers 7, 14, 21",
                     repeat(lambda: plain_run(engine, ids, three)), *big_kv)
    engine.unload()
    del engine
    free_gpu()

    hand, orch, memory = pair_rows(big_dir, small_dir, ids)
    both = (big_mem.weights + small_mem.weights, big_mem.cache_per_token + small_mem.cache_per_token,
            big_mem.weights + big_mem.cache_per_token * MEAN_CONTEXT)
    rows["d"] = row(f"(d) big + mirrored small + probe judge, hand-written loop, {CAP_GB:.0f} GB cap",
                    hand, *both)
    rows["d2"] = row(f"(d) CognitiveOrchestrator + ProbeJudge, overlap "
                     f"{'on' if orch['overlap'] else 'off'}, {CAP_GB:.0f} GB cap", orch, *both)

    data = {**stamp(card, bandwidth, exl_facts),
            "rows": [rows[k] for k in ("a", "a2", "b", "c1", "c3", "d", "d2", "e")],
            "memory": memory}
    (out / "gpu_decode.json").write_text(json.dumps(data, indent=1))
    print(render_speed(data) + "\n\n" + render_memory(data))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
