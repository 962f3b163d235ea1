"""CPU benchmark of the cognitive orchestrator on the embedded model (SmolLM2-135M, fp32).

Decode tokens/s (after the prefill) of the big model alone vs. with a mirrored small model
(a second instance, same vocabulary) and a ProbeJudge vs. a post-step DivergenceJudge that
re-runs steps, plus the text-level mirror of a tiny model with its own tokenizer. Per step:
time in the judges (``judge``) and all time outside model forwards (``overhead``: judges,
mixes, sampling, trace, mirror bookkeeping, stop strings, decoding). Prints one table.

    MAX_JUPYTER_CACHE=... PYTHONPATH=. python bench/cpu_orchestrator.py [--tokens 32] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from max_jupyter.engines import Engine, TransformersEngine
from max_jupyter.testing import build_tiny_model
from max_jupyter.orchestrator import (CognitiveOrchestrator, DivergenceJudge, Never, ProbeJudge,
                                      TraceConfig, plain)
from max_jupyter.steering import SteeringController, train_vector

PROMPT = "Write a short paragraph about the sea."
POSITIVE = ["I love this, it is wonderful!", "Great joy and happiness.", "What a lovely day."]
NEGATIVE = ["I hate this, it is terrible.", "Awful misery and sadness.", "What a dreadful day."]


def timed(engines: list[Engine]) -> list[float]:
    """Wrap each engine's ``forward`` to add its wall time to the returned one-item list."""
    spent = [0.0]
    for engine in engines:
        forward = engine.forward

        def run(*args, _forward=forward, **kwargs):
            t = time.perf_counter()
            try:
                return _forward(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t

        engine.forward = run
    return spent


def measure(name: str, orchestrator: CognitiveOrchestrator, tokens: int, spent: list[float]) -> dict:
    """Decode rate and per-step costs of one greedy generation of ``tokens`` tokens."""
    stamps: list[tuple[float, float]] = []
    result = orchestrator.generate(
        PROMPT, max_new_tokens=tokens, trace=TraceConfig(big_layers=(15,)),
        on_event=lambda ev: stamps.append((time.perf_counter(), spent[0])))
    (t0, f0), (t1, f1) = stamps[0], stamps[-1]
    steps = len(stamps) - 1  # steps after the prefill step
    judge = statistics.mean(r.judge_s for r in result.steps[1:])
    return {"config": name, "tok/s": steps / (t1 - t0), "ms/step": 1e3 * (t1 - t0) / steps,
            "forward ms/step": 1e3 * (f1 - f0) / steps,
            "overhead ms/step": 1e3 * ((t1 - t0) - (f1 - f0)) / steps,
            "judge ms/step": 1e3 * judge, "steered": sum(bool(r.steering) for r in result.steps),
            "re-runs": sum(r.rerun for r in result.steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per row")
    args = parser.parse_args()

    big, small = TransformersEngine.load(device="cpu"), TransformersEngine.load(device="cpu")
    tiny = TransformersEngine.load(build_tiny_model(tempfile.mkdtemp()), device="cpu")
    mix = SteeringController(big.identity)
    mix.set("happy", train_vector(big, POSITIVE, NEGATIVE, layers=[15], method="mean_diff"), 1.0)
    probe = train_vector(small, POSITIVE, NEGATIVE, layers=[15], method="mean_diff", label="happy")
    spent = timed([big, small, tiny])

    # A threshold inside the probe's range on this prompt, so it switches during the run.
    scout = CognitiveOrchestrator(big, small, ProbeJudge(probe, threshold=float("inf"), name="p"),
                                  steering=mix).generate(PROMPT, max_new_tokens=args.tokens)
    threshold = float(scout.scores["p"].median())

    configs = {
        "big alone (Never, no small)": CognitiveOrchestrator(big, None, Never(), steering=mix),
        "big + mirrored small + ProbeJudge": CognitiveOrchestrator(
            big, small, ProbeJudge(probe, threshold=threshold), steering=mix),
        "big + small + post-step entropy>2 judge": CognitiveOrchestrator(
            big, small, DivergenceJudge(2.0), steering=mix),
        "big + small + post-step KL>0.05 judge": CognitiveOrchestrator(
            big, small, DivergenceJudge(0.05, "kl"), steering=mix),
        "big + text-mirrored tiny (other tokenizer)": CognitiveOrchestrator(big, tiny, Never()),
    }
    rows = []
    start = time.perf_counter()
    plain.generate(big, PROMPT, max_new_tokens=args.tokens)  # warm-up
    plain_runs = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        g = plain.generate(big, PROMPT, max_new_tokens=args.tokens)
        plain_runs.append(len(g.token_ids) / (time.perf_counter() - t))
    for name, orchestrator in configs.items():
        runs = [measure(name, orchestrator, args.tokens, spent) for _ in range(args.repeats)]
        rows.append(max(runs, key=lambda r: r["tok/s"]))

    print(f"\nCPU, {torch.get_num_threads()} threads, SmolLM2-135M fp32 big + small, greedy, "
          f"{args.tokens} tokens, best of {args.repeats}; plain loop (incl. prefill): "
          f"{max(plain_runs):.1f} tok/s; probe threshold {threshold:.3g}")
    cols = ["config", "tok/s", "ms/step", "forward ms/step", "overhead ms/step", "judge ms/step",
            "steered", "re-runs"]
    widths = [max(len(c), 44 if c == "config" else 8) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        cells = [row[c] if isinstance(row[c], (str, int)) else
                 (f"{row[c]:.3f}" if "judge" in c or "overhead" in c else f"{row[c]:.1f}")
                 for c in cols]
        print(" | ".join(str(v).ljust(w) for v, w in zip(cells, widths)))
    print(f"(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
