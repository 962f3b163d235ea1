"""CPU decode speed of interventions beyond addition: unsteered decode vs. ablation at every
layer, and vs. 3 additions + 1 ablation + 1 clamp (docs/steering.md).

One run, one table. Each configuration generates the same number of tokens (EOS ignored)
from the same chat prompt, greedily, on the embedded SmolLM2-135M in fp32, through the one
generation loop (the orchestrator without a small model or judges, recording its trace);
the rounds interleave the configurations and the table shows the median and the ratio to
unsteered decode, of wall time and of the process's CPU time per token (CPU time is the
steadier measure of the work where other processes share the cores: wall time then
includes waiting for them). Steering is written as expressions and compiled as everywhere
else. Targets: each steered row at most 5% slower than unsteered.
Usage: ``python bench/cpu_interventions.py [--tokens 64] [--rounds 7]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from max_jupyter.engines import Engine, TransformersEngine
from max_jupyter.orchestrator import generate
from max_jupyter.steering import Mix, SteeringVector
from max_jupyter.steering.expression import entries, parse

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def random_vector(engine: Engine, layers, seed: int, scale: float = 0.5) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({l: scale * torch.randn(engine.identity.hidden_size, generator=g) for l in layers},
                          engine.identity, f"random{seed}")


def mix_of(engine: Engine, text: str, vectors: dict) -> Mix:
    """The mix of ``text`` (no gates), compiled as a generation's steering is."""
    made = {}
    for _clause, clause_entries in entries(parse(text), vectors, engine.identity):
        made.update(clause_entries)
    mix = Mix(engine.identity)
    mix.assign(made)
    return mix


def configurations(engine: Engine) -> dict[str, Mix | None]:
    """The rows, by name: unsteered, ablation at every layer, 3 additions, and 3 additions
    with 1 ablation and 1 clamp (random vectors at layers 8, 12, 16 and 20)."""
    every = range(engine.identity.num_layers)
    vectors = {"a": random_vector(engine, [8], 1), "b": random_vector(engine, [12], 2),
               "c": random_vector(engine, [16], 3), "d": random_vector(engine, every, 4),
               "e": random_vector(engine, [20], 5)}
    return {"unsteered": None,
            "ablation at every layer (!d)": mix_of(engine, "!d", vectors),
            "3 adds (a + b + c)": mix_of(engine, "a + b + c", vectors),
            "3 adds + 1 ablation + 1 clamp": mix_of(engine, "a + b + c + !d@12 + e[-1,1]", vectors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    engine = TransformersEngine.load(device="cpu")
    ids = engine.tokenizer.chat(PROMPT)
    steerings = configurations(engine)

    def run(steering) -> tuple[float, float]:
        """Wall and CPU milliseconds per token of one generation."""
        wall, cpu = time.perf_counter(), time.process_time()
        g = generate(engine, ids, max_new_tokens=args.tokens, ignore_eos=True, steering=steering)
        assert len(g.token_ids) == args.tokens
        return (1e3 * (time.perf_counter() - wall) / args.tokens,
                1e3 * (time.process_time() - cpu) / args.tokens)

    for steering in steerings.values():  # warm-up
        run(steering)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steerings}
    for _ in range(args.rounds):
        for name, steering in steerings.items():
            times[name].append(run(steering))

    wall = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    print(f"\nCPU decode, {args.tokens} new tokens, {args.rounds} rounds (median), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| configuration | wall ms/token | wall vs unsteered | CPU ms/token | CPU vs unsteered | CPU spread |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in times.items():
        c = [c for _, c in t]
        print(f"| {name} | {wall[name]:.1f} | {wall[name] / wall['unsteered']:.3f} | {cpu[name]:.1f} | "
              f"{cpu[name] / cpu['unsteered']:.3f} | {(max(c) - min(c)) / cpu[name]:.1%} |")
    steered = ("ablation at every layer (!d)", "3 adds + 1 ablation + 1 clamp")
    print("target: each steered row at most 1.05x unsteered -> worst: wall "
          f"{max(wall[n] for n in steered) / wall['unsteered']:.3f}, "
          f"CPU {max(cpu[n] for n in steered) / cpu['unsteered']:.3f}")


if __name__ == "__main__":
    main()
