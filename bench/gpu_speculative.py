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

These rows draft by acceptance alone (``pace_speculation`` off), to measure speed against
acceptance; the rows marked "paced" run the library's default, which pauses speculation
where it costs more wall time per token than plain steps.

Rows (ii) and (iii) draft with a 7B-sized model, so they compare against the orchestrator
mirroring that same 7B model without speculation ("mirror-7B"); their break-even acceptance
is where the measured curve crosses that row. For the real pair's shapes the same break-even
follows from measured pass times (a 1.5B step, a 7B step, a 7B verify of ``k + 1`` tokens)
by the fixed-length model ``ms/token = (k * small + verify + small * P(reject)) / E[tokens
per block]`` with per-token acceptance ``alpha``; the model is printed next to the measured
7B-drafter rows so it can be checked. Writes ``$OUT/gpu_speculative.json`` for
``bench/gpu_tables.py``. Run: ``bash bench/gpu_session.sh speculative`` (see docs/gpu.md).
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
from gpu_decode import build_hf, exllamav2_generator, free_gpu, plain_run, repeat, save_gptq, stamp
from gpu_tables import render_speculative

from max_jupyter.engines.exllamav2 import ExLlamaV2Engine
from max_jupyter.orchestrator import CognitiveOrchestrator

PROMPT, NEW, RUNS = 512, 256, 3
K = (3, 4)  # draft lengths of rows (i) and (ii); rows (iii) and the model use the first
VERIFY = range(2, 7)  # verify lengths whose pass times are measured
NOISE = (0.002, 0.005, 0.01, 0.02)  # weight noise of the 7B drafters, in units of each tensor's std
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
                 k: int, paced: bool = False) -> dict:
    """The orchestrator with ``drafter`` mirroring the big model, speculating up to ``k``
    (0: off), by acceptance alone or ``paced`` (the default of the library: paused where
    it does not pay); timing as every row, plus the last run's acceptance and big passes
    per token."""
    orch = CognitiveOrchestrator(big, drafter)
    orch.pace_speculation = paced
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
    return {**result, **last, "k": k, "paced": paced}


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
    """ms of one step of each model and of the big model's verify of each length in
    ``VERIFY``, at the prompt's end (each pass rewound after it)."""
    big.prefill(ids)
    small.prefill(ids)

    def passes(engine, n: int) -> Callable[[], None]:
        def run() -> None:
            engine.verify(ids[:n]) if n > 1 else engine.step(ids[0])
            engine.rewind(n)
        return run

    return {"big": timed_ms(passes(big, 1)), "small": timed_ms(passes(small, 1)),
            "verify": {n: timed_ms(passes(big, n)) for n in VERIFY}}


def modelled_ms(times: dict, small_ms: float, alpha: float, k: int) -> float:
    """ms/token of fixed-length-``k`` speculation at per-token acceptance ``alpha``: ``k``
    drafter steps and one verify of ``k + 1`` tokens per block, one more drafter step (the
    correction) when a draft is rejected, over the expected ``sum(alpha^i, i=0..k)`` tokens
    a block emits."""
    tokens = sum(alpha ** i for i in range(k + 1))
    return (k * small_ms + times["verify"][k + 1] + small_ms * (1 - alpha ** k)) / tokens


def solve_alpha(times: dict, small_ms: float, target_ms: float, k: int) -> float | None:
    """The per-token acceptance at which the model's ms/token equals ``target_ms`` (bisection;
    None if even acceptance 1 is slower)."""
    lo, hi = 0.0, 1.0
    if modelled_ms(times, small_ms, hi, k) > target_ms:
        return None
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if modelled_ms(times, small_ms, mid, k) > target_ms else (lo, mid)
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
                                   ("acceptance", "drafted", "accepted", "big_passes", "k", "paced")}}


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
    big = load(folders["big"])
    small = load(folders["small"])
    rows = pair_rows(big, small, ids, "(i) mirror-1.5B", "(i) 1.5B random drafter", "1.5B")
    times = pass_times(big, small, ids)
    small.unload()
    free_gpu()
    copy = load(folders["big"])
    rows += pair_rows(big, copy, ids, "(ii) mirror-7B", "(ii) 7B drafting for itself", "7B")
    copy.unload()
    free_gpu()
    for sigma in NOISE:
        noised = load(folders[f"noise {sigma:g}"])
        rows.append(row(f"(iii) 7B + noise {sigma:g}, speculate={K[0]}",
                        orchestrated(big, noised, ids, K[0]), "7B"))
        if sigma == NOISE[-2]:  # partial acceptance, slower than the mirror: pacing's case
            rows.append(row(f"(iii) 7B + noise {sigma:g}, speculate={K[0]}, paced (the default)",
                            orchestrated(big, noised, ids, K[0], paced=True), "7B"))
        noised.unload()
        free_gpu()
    big.unload()
    free_gpu()
    return rows, times


def pair_rows(big: ExLlamaV2Engine, drafter: ExLlamaV2Engine, ids: list[int], mirror: str,
              speculating: str, shape: str) -> list[dict]:
    """The orchestrator with ``drafter`` mirroring: without speculation, then with each ``K``."""
    rows = [row(f"{mirror}, no speculation", orchestrated(big, drafter, ids, 0), shape)]
    rows += [row(f"{speculating}, speculate={k}", orchestrated(big, drafter, ids, k), shape) for k in K]
    rows.append(row(f"{speculating}, speculate={K[0]}, paced (the default)",
                    orchestrated(big, drafter, ids, K[0], paced=True), shape))
    return rows


def break_even(rows: list[dict], times: dict) -> list[str]:
    """Where speculation starts to pay: measured for the 7B drafters (rows with ``K[0]``),
    modelled for the 1.5B drafter."""
    k = K[0]
    measured = [(r["acceptance"], r["ms"]) for r in rows if r["drafter"] == "7B" and r["k"] == k
                and not r["paced"] and r["acceptance"] is not None]
    lines = []
    for name, target in (("mirror-7B, no speculation", rows_ms(rows, "(ii) mirror")),
                         ("(b) our plain loop", rows_ms(rows, "(b)")),
                         ("(a) exllamav2's generator", rows_ms(rows, "(a)"))):
        a = crossing(measured, target)
        lines.append(f"7B drafter, measured (speculate={k}): break-even against {name} at "
                     "acceptance " + ("(not reached)" if a is None else f"{a:.2f}"))
    for name, target in (("mirror-1.5B, no speculation", rows_ms(rows, "(i) mirror")),
                         ("(b) our plain loop", rows_ms(rows, "(b)")),
                         ("(a) exllamav2's generator", rows_ms(rows, "(a)"))):
        a = solve_alpha(times, times["small"], target, k)
        lines.append(f"1.5B drafter, modelled (fixed length {k}): break-even against {name} at "
                     "per-token acceptance " + ("(not reached)" if a is None else f"{a:.2f}"))
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
    for r in rows:  # the model's ms/token where it applies: 7B drafters, speculating unpaced
        r["model_ms"] = (modelled_ms(times, times["big"], r["acceptance"], r["k"])
                         if r["drafter"] == "7B" and r["k"] and not r["paced"]
                         and r["acceptance"] is not None else None)
    data["break_even"] = break_even(rows, times)
    (out / "gpu_speculative.json").write_text(json.dumps(data, indent=1))
    print(render_speculative(data))


if __name__ == "__main__":
    main()
