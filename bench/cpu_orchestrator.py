"""CPU benchmark of the cognitive orchestrator on the embedded model (SmolLM2-135M, fp32).

Decode tokens/s (after the prefill) of the big model alone vs. with a mirrored small model
(a second instance, same vocabulary) and a ProbeJudge vs. a post-step DivergenceJudge that
re-runs steps, plus the text-level mirror of a tiny model with its own tokenizer. Per step:
time in the judges (``judge``) and all time outside model forwards (``overhead``: judges,
mixes, sampling, trace, mirror bookkeeping, stop strings, decoding). Every row generates the
same number of tokens (EOS ignored; the ``tokens`` column shows it); the rounds interleave
the rows and the table shows the median of each column, as ``bench/cpu_steering.py`` does.

    MAX_JUPYTER_CACHE=... PYTHONPATH=. python bench/cpu_orchestrator.py [--tokens 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from max_jupyter.engines import Engine, TransformersEngine
from max_jupyter.orchestrator import CognitiveOrchestrator, DivergenceJudge, Never, ProbeJudge, TraceConfig, plain
from max_jupyter.steering import Mix, train_vector
from max_jupyter.testing import build_tiny_model

PROMPT = "Write a short paragraph about the sea."
POSITIVE = ["I love this, it is wonderful!", "Great joy and happiness.", "What a lovely day."]
NEGATIVE = ["I hate this, it is terrible.", "Awful misery and sadness.", "What a dreadful day."]


def timed(engines: list[Engine]) -> list[float]:
    """Wrap each engine's ``_forward`` (every forward pass: prefill, step, re-run) to add its
    wall time to the returned one-item list."""
    spent = [0.0]
    for engine in engines:
        forward = engine._forward

        def run(*args, _forward=forward, **kwargs):
            t = time.perf_counter()
            try:
                return _forward(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t

        engine._forward = run
    return spent


def measure(orchestrator: CognitiveOrchestrator, tokens: int, spent: list[float]) -> dict:
    """Decode rate and per-step costs of one greedy generation of ``tokens`` tokens (EOS
    ignored), over the steps after the prefill step."""
    stamps: list[tuple[float, float]] = []
    result = orchestrator.generate(
        PROMPT, max_new_tokens=tokens, trace=TraceConfig(big_layers=(15,)), ignore_eos=True,
        on_event=lambda ev: ev.record and stamps.append((time.perf_counter(), spent[0])))
    (t0, f0), (t1, f1) = stamps[0], stamps[-1]
    steps = len(stamps) - 1  # steps after the prefill step
    judge = statistics.mean(r.judge_s for r in result.steps[1:])
    return {"tokens": len(result.token_ids), "tok/s": steps / (t1 - t0),
            "ms/step": 1e3 * (t1 - t0) / steps, "forward ms/step": 1e3 * (f1 - f0) / steps,
            "overhead ms/step": 1e3 * ((t1 - t0) - (f1 - f0)) / steps,
            "judge ms/step": 1e3 * judge, "steered": sum(bool(r.mixes_on) for r in result.steps),
            "re-runs": sum(r.rerun for r in result.steps),
            "ahead misses": result.ahead_misses}


COUNTS = ("tokens", "steered", "re-runs", "ahead misses")


def cell(column: str, value) -> str:
    """A table cell: counts as they are, judge and overhead times to 3 decimals, else 1."""
    if isinstance(value, str):
        return value
    if column in COUNTS:
        return f"{value:g}"
    return f"{value:.3f}" if "judge" in column or "overhead" in column else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="median of this many runs per row")
    args = parser.parse_args()

    big, small = TransformersEngine.load(device="cpu"), TransformersEngine.load(device="cpu")
    tiny = TransformersEngine.load(build_tiny_model(tempfile.mkdtemp()), device="cpu")
    mix = Mix(big.identity)
    mix.set("happy", train_vector(big, POSITIVE, NEGATIVE, layers=[15], method="mean_diff"), 1.0)
    probe = train_vector(small, POSITIVE, NEGATIVE, layers=[15], method="mean_diff", label="happy")
    spent = timed([big, small, tiny])

    # A threshold inside the probe's range on this prompt, so it switches during the run.
    scout = CognitiveOrchestrator(big, small, judges=ProbeJudge(probe, threshold=float("inf"),
                                                                name="p"), mixes=mix)
    threshold = float(scout.generate(PROMPT, max_new_tokens=args.tokens,
                                     ignore_eos=True).scores["p"].median())

    configs = {
        "big alone (Never, no small)": CognitiveOrchestrator(big, None, judges=Never(), mixes=mix),
        "big + mirrored small + ProbeJudge": CognitiveOrchestrator(
            big, small, judges=ProbeJudge(probe, threshold=threshold), mixes=mix),
        "big + small + post-step entropy>2 judge": CognitiveOrchestrator(
            big, small, judges=DivergenceJudge(2.0), mixes=mix),
        "big + small + post-step KL>0.05 judge": CognitiveOrchestrator(
            big, small, judges=DivergenceJudge(0.05, "kl"), mixes=mix),
        "big + text-mirrored tiny (other tokenizer)": CognitiveOrchestrator(big, tiny, judges=Never()),
    }
    start = time.perf_counter()

    def plain_rate() -> float:
        t = time.perf_counter()
        g = plain.generate(big, PROMPT, max_new_tokens=args.tokens, ignore_eos=True)
        assert len(g.token_ids) == args.tokens
        return len(g.token_ids) / (time.perf_counter() - t)

    plain_rate()  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    plain_runs = []
    for _ in range(args.rounds):  # interleaved: drift of the shared machine hits every row
        plain_runs.append(plain_rate())
        for name, orchestrator in configs.items():
            runs[name].append(measure(orchestrator, args.tokens, spent))

    print(f"\nCPU, {torch.get_num_threads()} threads, SmolLM2-135M fp32 big + small, greedy, "
          f"{args.tokens} tokens (EOS ignored), median of {args.rounds} rounds; plain loop "
          f"(incl. prefill): {statistics.median(plain_runs):.1f} tok/s; probe threshold "
          f"{threshold:.3g}")
    cols = ["tokens", "tok/s", "spread", "ms/step", "forward ms/step", "overhead ms/step",
            "judge ms/step", "steered", "re-runs", "ahead misses"]
    widths = [44] + [max(len(c), 8) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(["config", *cols], widths)))
    print("-+-".join("-" * w for w in widths))
    for name, rows in runs.items():
        med = {c: statistics.median(r[c] for r in rows) for c in rows[0]}
        rates = [r["tok/s"] for r in rows]
        med["spread"] = f"{(max(rates) - min(rates)) / med['tok/s']:.1%}"
        cells = [name] + [cell(c, med[c]) for c in cols]
        print(" | ".join(str(v).ljust(w) for v, w in zip(cells, widths)))
    print(f"(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
