"""CPU decode speed of interventions beyond addition: unsteered decode vs. ablation at every
layer, and vs. 3 additions + 1 ablation + 1 clamp (docs/steering.md).

One run, one table. Each configuration generates the same number of tokens (EOS ignored)
from the same chat prompt, greedily, on the embedded SmolLM2-135M in fp32, through the one
generation loop (the orchestrator without a small model or judges, recording its trace);
the rounds interleave the configurations and the table shows the median and the ratio to
unsteered decode. Steering is written as expressions and compiled as everywhere else.
Targets: each steered row >= 0.95 of unsteered (at most 5% slower).
Usage: ``python bench/cpu_interventions.py [--tokens 64] [--rounds 7]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from max_jupyter.engines import TransformersEngine
from max_jupyter.orchestrator import generate
from max_jupyter.steering import Mix, SteeringVector
from max_jupyter.steering.expression import entries, parse

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def random_vector(engine: TransformersEngine, layers, seed: int, scale: float = 0.5) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({l: scale * torch.randn(engine.identity.hidden_size, generator=g) for l in layers},
                          engine.identity, f"random{seed}")


def mix_of(engine: TransformersEngine, text: str, vectors: dict) -> Mix:
    """The mix of ``text`` (no gates), compiled as a generation's steering is."""
    made = {}
    for _clause, clause_entries in entries(parse(text), vectors, engine.identity):
        made.update(clause_entries)
    mix = Mix(engine.identity)
    mix.assign(made)
    return mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    engine = TransformersEngine.load(device="cpu")
    ids = engine.tokenizer.chat(PROMPT)
    every = range(engine.identity.num_layers)
    vectors = {"a": random_vector(engine, [8], 1), "b": random_vector(engine, [12], 2),
               "c": random_vector(engine, [16], 3), "d": random_vector(engine, every, 4),
               "e": random_vector(engine, [20], 5)}
    steerings = {"unsteered": None,
                 "ablation at every layer (!d)": mix_of(engine, "!d", vectors),
                 "3 adds (a + b + c)": mix_of(engine, "a + b + c", vectors),
                 "3 adds + 1 ablation + 1 clamp": mix_of(engine, "a + b + c + !d@12 + e[-1,1]", vectors)}

    def run(steering) -> float:
        start = time.perf_counter()
        g = generate(engine, ids, max_new_tokens=args.tokens, ignore_eos=True, steering=steering)
        assert len(g.token_ids) == args.tokens
        return args.tokens / (time.perf_counter() - start)

    for steering in steerings.values():  # warm-up
        run(steering)
    rates: dict[str, list[float]] = {name: [] for name in steerings}
    for _ in range(args.rounds):
        for name, steering in steerings.items():
            rates[name].append(run(steering))

    med = {name: statistics.median(r) for name, r in rates.items()}
    base = med["unsteered"]
    print(f"\nCPU decode, {args.tokens} new tokens, {args.rounds} rounds (median), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| {'configuration':32} | {'tok/s':>7} | {'vs unsteered':>12} | {'spread':>6} |")
    print(f"|{'-' * 34}|{'-' * 9}|{'-' * 14}|{'-' * 8}|")
    for name, r in rates.items():
        spread = (max(r) - min(r)) / med[name]
        print(f"| {name:32} | {med[name]:7.2f} | {med[name] / base:12.3f} | {spread:6.1%} |")
    worst = min(med[n] for n in ("ablation at every layer (!d)", "3 adds + 1 ablation + 1 clamp")) / base
    print(f"target: each steered row >= 0.95 of unsteered -> worst {worst:.3f}")


if __name__ == "__main__":
    main()
