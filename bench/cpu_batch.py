"""CPU batched generation: 8 mixed prompts with 8 different steering configurations as one
batch (``Session.generate_batch``) against the same 8 generations one after another
(``Session.generate``), and the batch steered per row against the same batch unsteered
and with one shared configuration.

One run, one table. Every configuration generates the same tokens per row (EOS ignored),
greedily, on the embedded SmolLM2-135M in fp32, through the Session's worker (traces
recorded as always); the rounds interleave the configurations and the table shows the
median. Tokens/s counts all 8 rows' tokens over the whole call (prefills included); "tok/CPU-s"
counts them per second of this process's CPU time (both threads' work: steadier than the
wall clock on a machine shared with other jobs, which take cores from the wall time). Row
``r``'s steering is a random vector at layer ``2 + 3r`` at coefficient ``0.5 + r / 4``
(a different vector, layer and coefficient per row). Targets: the batch >= 3x one after
another; per-row steering costs <= 10% against the same batch unsteered.
Usage: ``python bench/cpu_batch.py [--tokens 32] [--rounds 3]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from max_jupyter.engines import TransformersEngine
from max_jupyter.session import Session
from max_jupyter.steering import SteeringVector

PROMPTS = ["Hi!", "Write a long story about a lighthouse keeper and a storm.", "What is 17 times 23?",
           "List five rivers in Europe and one fact about each of them.", "Translate 'good morning' into French.",
           "Explain in detail how a refrigerator keeps food cold, step by step, for a child.",
           "Name a color.", "Why is the sky blue? Answer in two sentences."]


def row_steering(engine: TransformersEngine) -> list[SteeringVector]:
    """Row r: a random vector at layer 2 + 3r, coefficient 0.5 + r / 4 (norm ~12 before it)."""
    out = []
    for r in range(len(PROMPTS)):
        g = torch.Generator().manual_seed(r)
        v = SteeringVector({2 + 3 * r: 0.5 * torch.randn(engine.identity.hidden_size, generator=g)},
                           engine.identity, f"random@{2 + 3 * r}")
        out.append(v * (0.5 + r / 4))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    engine = TransformersEngine.load(device="cpu")
    session = Session(engine)
    steering = row_steering(engine)
    n, total = args.tokens, args.tokens * len(PROMPTS)

    def timed(call) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        results = call()
        assert [len(r.token_ids) for r in results] == [n] * len(PROMPTS)
        return total / (time.perf_counter() - start), total / (time.process_time() - cpu)

    def one_by_one() -> list:
        return [session.generate(p, steering=s, max_new_tokens=n, ignore_eos=True)
                for p, s in zip(PROMPTS, steering)]

    def batch(steer) -> list:
        return session.generate_batch(PROMPTS, steer, max_new_tokens=n, ignore_eos=True, progress=False)

    configs = {"one after another, 8 configs": one_by_one,
               "batch 8, unsteered": lambda: batch(None),
               "batch 8, 1 config shared": lambda: batch(steering[3]),
               "batch 8, 8 configs (per row)": lambda: batch(steering)}
    for call in configs.values():  # warm-up
        timed(call)
    rates: dict[str, list[float]] = {name: [] for name in configs}
    cpu_rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, call in configs.items():
            wall, cpu = timed(call)
            rates[name].append(wall)
            cpu_rates[name].append(cpu)
    session.close()

    med = {name: statistics.median(r) for name, r in rates.items()}
    cpu = {name: statistics.median(r) for name, r in cpu_rates.items()}
    seq, plain, per_row = "one after another, 8 configs", "batch 8, unsteered", "batch 8, 8 configs (per row)"
    print(f"\nCPU batched generation, 8 rows x {n} new tokens, {args.rounds} rounds (median), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'configuration':32} {'tok/s':>8} {'vs 1-by-1':>10} {'vs unsteered':>13} {'spread':>7} "
          f"{'tok/CPU-s':>10} {'vs 1-by-1':>10} {'vs unsteered':>13}")
    for name, r in rates.items():
        spread = (max(r) - min(r)) / med[name]
        print(f"{name:32} {med[name]:8.2f} {med[name] / med[seq]:10.3f} {med[name] / med[plain]:13.3f} "
              f"{spread:7.1%} {cpu[name]:10.2f} {cpu[name] / cpu[seq]:10.3f} {cpu[name] / cpu[plain]:13.3f}")
    print(f"targets: batch per row / one after another >= 3 -> {med[per_row] / med[seq]:.3f} "
          f"(CPU time {cpu[per_row] / cpu[seq]:.3f}); per-row steering cost <= 10% -> "
          f"{1 - med[per_row] / med[plain]:+.1%} (CPU time {1 - cpu[per_row] / cpu[plain]:+.1%})")


if __name__ == "__main__":
    main()
