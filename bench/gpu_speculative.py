"""Speculative decoding on the ExLlamaV2 backend: tokens/s against acceptance, on a lent GPU.

With random weights an acceptance rate means nothing by itself, so the drafter is varied
to sweep it, and every row is timed over the same work: a Qwen2.5-7B-shaped big model
(4-bit GPTQ, random) decodes the same ``PROMPT``-token prompt greedily to ``NEW + 1``
tokens, timed from the first new token on the host to the last (forward passes, greedy
picks, detokenisation), one warm-up then the median of ``RUNS`` runs.

  (a) exllamav2's dynamic generator on the big model (the peer), (b) our plain loop
  (i)   the real pair: a 1.5B-shaped random drafter (acceptance about 0), without and with
        speculation: the adaptive fallback's cost
  (ii)  the big model drafting for itself (a second engine on the same folder; acceptance 1:
        the ceiling), without and with speculation
  (iii) drafts from copies of the big model with growing weight noise (Gaussian, ``sigma``
        times each tensor's std, then 4-bit again): acceptance in between

Rows (ii) and (iii) draft with a 7B-sized model, so they compare against the orchestrator
mirroring that same 7B model without speculation ("mirror-7B"); their break-even acceptance
is where the measured curve crosses that row. For the real pair's shapes the same break-even
follows from measured pass times (a 1.5B step, a 7B step, a 7B verify of ``K + 1`` tokens)
by the fixed-length model ``ms/token = (K * small + verify + small * P(reject)) / E[tokens
per block]`` with per-token acceptance ``alpha``; the model is printed next to the measured
7B-drafter rows so it can be checked. Writes ``$OUT/gpu_speculative.json``.
Run: ``bash bench/gpu_session.sh speculative`` (see docs/gpu.md).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpu_decode import (build_hf, exllamav2_generator, free_gpu, plain_run, repeat, save_gptq,
                        stamp)
from max_jupyter.engines.exllamav2 import ExLlamaV2Engine
from max_jupyter.orchestrator import CognitiveOrchestrator

PROMPT, NEW, RUNS, K = 512, 256, 3, 4
NOISE = (0.05, 0.1, 0.2, 0.4)  # weight noise of the 7B drafters, in units of each tensor's std
TOKENIZER_VOCAB = 49152  # ids the borrowed tokenizer has (the head's rows past it are zero)


def add_noise(model, sigma: float, seed: int) -> None:
    """Add Gaussian noise of ``sigma`` x each parameter's std to ``model`` in place; the
    head's padding rows stay zero."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * p.std() * sigma)
        model.lm_head.weight[TOKENIZER_VOCAB:] = 0


def build_folders(work: Path, tokenizer: Path) -> dict[str, Path]:
    """The big GPTQ folder, the 1.5B drafter's and one noised copy of the big model per
    ``NOISE`` level (noise added cumulatively: independent draws, so the std adds in
    quadrature to exactly ``sigma``)."""
    model = build_hf("7B")
    folders = {"big": save_gptq(model, work / "big", tokenizer)}
    done = 0.0
    for i, sigma in enumerate(NOISE):
        add_noise(model, math.sqrt(sigma ** 2 - done ** 2), seed=i)
        done = sigma
        folders[f"noise {sigma:g}"] = save_gptq(model, work / f"noise-{sigma:g}", tokenizer)
    del model
    free_gpu()
    folders["small"] = save_gptq(build_hf("1.5B"), work / "small", tokenizer)
    free_gpu()
    return folders


def load(folder: Path) -> ExLlamaV2Engine:
    return ExLlamaV2Engine.load(folder, cache_tokens=2048)


def orchestrated(big: ExLlamaV2Engine, drafter: ExLlamaV2Engine, ids: list[int],
                 k: int) -> dict:
    """The orchestrator with ``drafter`` mirroring the big model, speculating up to ``k``
    (0: off); timing as every row, plus the last run's acceptance and big passes per token."""
    orch = CognitiveOrchestrator(big, drafter)
    last: dict = {}

    def run() -> tuple[float, int]:
        stamps: list[float] = []  # one per step, after its token was picked and decoded
        calls = big.forward_calls
        r = orch.generate(ids, max_new_tokens=NEW + 1, ignore_eos=True, speculate=k,
                          on_event=lambda e: e.record and stamps.append(time.perf_counter()))
        assert len(stamps) == NEW + 1 and r.speculate_off is None, r.speculate_off
        last.update(acceptance=r.acceptance_rate, drafted=r.drafted_tokens,
                    accepted=r.accepted_tokens, big_passes=(big.forward_calls - calls) / (NEW + 1))
        return stamps[-1] - stamps[0], 0

    result = repeat(run, NEW, RUNS)
    return {**result, **last, "k": k}


def timed_ms(fn: Callable[[], object], reps: int = 30) -> float:
    """Median ms of ``fn`` (synchronised), after two warm-ups (the second replays graphs)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def pass_times(big: ExLlamaV2Engine, small: ExLlamaV2Engine, ids: list[int]) -> dict:
    """ms of one step of each model and of the big model's verify of ``K + 1`` tokens, at
    the prompt's end (each pass rewound after it)."""
    big.prefill(ids)
    small.prefill(ids)

    def passes(engine, n: int) -> Callable[[], None]:
        def run() -> None:
            engine.verify(ids[:n]) if n > 1 else engine.step(ids[0])
            engine.rewind(n)
        return run

    return {"big": timed_ms(passes(big, 1)), "small": timed_ms(passes(small, 1)),
            "verify": timed_ms(passes(big, K + 1))}


def modelled_ms(times: dict, small_ms: float, alpha: float) -> float:
    """ms/token of fixed-length-``K`` speculation at per-token acceptance ``alpha``: ``K``
    drafter steps and one verify per block, one more drafter step (the correction) when a
    draft is rejected, over the expected ``sum(alpha^i, i=0..K)`` tokens a block emits."""
    tokens = sum(alpha ** i for i in range(K + 1))
    return (K * small_ms + times["verify"] + small_ms * (1 - alpha ** K)) / tokens


def solve_alpha(times: dict, small_ms: float, target_ms: float) -> float | None:
    """The per-token acceptance at which the model's ms/token equals ``target_ms`` (bisection;
    None if even acceptance 1 is slower)."""
    lo, hi = 0.0, 1.0
    if modelled_ms(times, small_ms, hi) > target_ms:
        return None
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if modelled_ms(times, small_ms, mid) > target_ms else (lo, mid)
    return hi


def crossing(points: list[tuple[float, float]], target_ms: float) -> float | None:
    """Acceptance where the measured (acceptance, ms/token) curve, linearly interpolated,
    reaches ``target_ms`` (None if it never does)."""
    points = sorted(points)
    for (a0, m0), (a1, m1) in zip(points, points[1:]):
        if (m0 - target_ms) * (m1 - target_ms) <= 0 and m0 != m1:
            return a0 + (a1 - a0) * (m0 - target_ms) / (m0 - m1)
    return None


def row(label: str, result: dict, drafter: str | None = None) -> dict:
    return {"label": label, "ms": statistics.median(result["ms"]), "runs_ms": result["ms"],
            "drafter": drafter, **{k: result.get(k) for k in
                                   ("acceptance", "drafted", "accepted", "big_passes", "k")}}


def peer_rows(folders: dict[str, Path], ids: list[int]) -> tuple[list[dict], dict]:
    """(a) exllamav2's generator and (b) our plain loop on the big model alone."""
    label, facts, run, held = exllamav2_generator(folders["big"], ids, NEW)
    rows = [row(label, repeat(run, NEW, RUNS))]
    held[0].unload()
    del run, held
    free_gpu()
    big = load(folders["big"])
    rows.append(row("(b) ours, plain loop, big model alone",
                    repeat(lambda: plain_run(big, ids, new=NEW), NEW, RUNS)))
    big.unload()
    free_gpu()
    return rows, facts


def drafter_rows(folders: dict[str, Path], ids: list[int]) -> tuple[list[dict], dict]:
    """Rows (i)-(iii) with the big model loaded once, and the pass times of the real pair."""
    big, rows = load(folders["big"]), []
    small = load(folders["small"])
    rows.append(row("(i) mirror-1.5B, no speculation", orchestrated(big, small, ids, 0), "1.5B"))
    rows.append(row(f"(i) 1.5B random drafter, speculate={K}", orchestrated(big, small, ids, K), "1.5B"))
    times = pass_times(big, small, ids)
    small.unload()
    free_gpu()
    copy = load(folders["big"])
    rows.append(row("(ii) mirror-7B, no speculation", orchestrated(big, copy, ids, 0), "7B"))
    rows.append(row(f"(ii) 7B drafting for itself, speculate={K}", orchestrated(big, copy, ids, K), "7B"))
    copy.unload()
    free_gpu()
    for sigma in NOISE:
        noised = load(folders[f"noise {sigma:g}"])
        rows.append(row(f"(iii) 7B + noise {sigma:g}, speculate={K}",
                        orchestrated(big, noised, ids, K), "7B"))
        noised.unload()
        free_gpu()
    big.unload()
    free_gpu()
    return rows, times


def render(data: dict) -> str:
    """The table (ms/token, tok/s, ratios, acceptance, big passes per token, the model's
    prediction for 7B-drafter rows) and the break-even lines."""
    rows, times = data["rows"], data["pass_ms"]
    base = rows[0]["ms"]
    mirror = {r["drafter"]: r["ms"] for r in rows if r["k"] == 0}
    lines = [f"Measured {data['date']} at commit `{data['commit']}` on {data['card']} (torch "
             f"{data['torch']}, exllamav2 {data['exllamav2']['version']}); batch 1, greedy, "
             f"{data['prompt']}-token prompt, every row timed over the same {data['new']} tokens, "
             f"median of {data['runs']} runs after a warm-up. Pass times (ms): 7B step "
             f"{times['big']:.2f}, 1.5B step {times['small']:.2f}, 7B verify of {K + 1} tokens "
             f"{times['verify']:.2f}.", "",
             "| row | ms/token | tok/s | vs (a) | vs mirror, no spec. | acceptance | big passes/token | model ms/token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs_mirror = f"{mirror[r['drafter']] / r['ms']:.2f}" if r["drafter"] else "-"
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        passes = "-" if r["big_passes"] is None else f"{r['big_passes']:.2f}"
        model = ("-" if r["drafter"] != "7B" or not r["k"] or r["acceptance"] is None else
                 f"{modelled_ms(times, times['big'], r['acceptance']):.2f}")
        lines.append(f"| {r['label']} | {r['ms']:.2f} | {1e3 / r['ms']:.1f} | {base / r['ms']:.2f} | "
                     f"{vs_mirror} | {acc} | {passes} | {model} |")
    lines += ["", *(f"- {line}" for line in data["break_even"])]
    return "\n".join(lines)


def break_even(rows: list[dict], times: dict) -> list[str]:
    """Where speculation starts to pay: measured for the 7B drafters, modelled for 1.5B."""
    measured = [(r["acceptance"], r["ms"]) for r in rows
                if r["drafter"] == "7B" and r["k"] and r["acceptance"] is not None]
    lines = []
    for name, target in (("mirror-7B, no speculation", rows_ms(rows, "(ii) mirror")),
                         ("(b) our plain loop", rows_ms(rows, "(b)")),
                         ("(a) exllamav2's generator", rows_ms(rows, "(a)"))):
        a = crossing(measured, target)
        lines.append(f"7B drafter, measured: break-even against {name} at acceptance "
                     + ("(not reached)" if a is None else f"{a:.2f}"))
    for name, target in (("mirror-1.5B, no speculation", rows_ms(rows, "(i) mirror")),
                         ("(b) our plain loop", rows_ms(rows, "(b)")),
                         ("(a) exllamav2's generator", rows_ms(rows, "(a)"))):
        a = solve_alpha(times, times["small"], target)
        lines.append(f"1.5B drafter, modelled (K={K}): break-even against {name} at per-token "
                     f"acceptance " + ("(not reached)" if a is None else f"{a:.2f}"))
    return lines


def rows_ms(rows: list[dict], prefix: str) -> float:
    return next(r["ms"] for r in rows if r["label"].startswith(prefix))


def main() -> None:
    tokenizer_dir = Path(os.environ["MAX_JUPYTER_TOKENIZER"])
    out = Path(os.environ.get("OUT", tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="maxspec-"))
    torch.backends.cuda.enable_cudnn_sdp(False)  # as gpu_decode: cuDNN re-plans per KV length
    ids = torch.randint(0, TOKENIZER_VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    folders = build_folders(work, tokenizer_dir)
    peers, facts = peer_rows(folders, ids)
    drafts, times = drafter_rows(folders, ids)
    rows = peers + drafts
    data = {**stamp(torch.cuda.get_device_name(), 0.0, facts), "prompt": PROMPT, "new": NEW,
            "runs": RUNS, "rows": rows, "pass_ms": times, "noise": NOISE}
    del data["bandwidth"]  # not measured here
    data["break_even"] = break_even(rows, times)
    (out / "gpu_speculative.json").write_text(json.dumps(data, indent=1))
    print(render(data))


if __name__ == "__main__":
    main()
