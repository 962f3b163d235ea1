"""SessionPool scaling on this machine: tokens/s of one actor against two for the same
batched job.

One run, one table. Each configuration is a fresh local Ray runtime of N logical cores
(``ray.init(num_cpus=N)``) and a ``SessionPool`` of the embedded SmolLM2-135M in fp32 on
the CPU; each CPU actor runs torch on its share of the cores. Every configuration runs the
same job (``--rows`` chat prompts, ``--tokens`` tokens each, EOS ignored, greedy, every
other row steered) through ``pool.generate_batch``; the first job after the start warms
the actors and is not timed, then ``--rounds`` timed jobs; the table shows the median.
Each actor generates its share as one batch (``Session.generate_batch``).
Tokens/s counts generated tokens over the job's wall time (splitting, sending, merging
included; starting the pool not). Expect close to 2x for two one-core actors against one
on 2 cores, less where other processes share the cores.
Usage: ``python bench/pool_scaling.py [--rows 8] [--tokens 32] [--rounds 2] [--big FOLDER]
[--actors 1,2]`` (``--actors 1,2,4,8``: more one-core actors, on a machine with the cores;
bench/gpu_session.sh's ``pool`` mode runs it so on a lent box's CPUs).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import ray
import torch

from max_jupyter import SessionPool
from max_jupyter.pool.runtime import init_ray
from max_jupyter.steering import SteeringVector

PROMPTS = ["Write a story about a lighthouse.", "Explain how rain forms.", "Describe a busy market.",
           "Give advice to a new gardener.", "Tell me about the moon.", "Write a letter to a friend.",
           "Describe your favourite meal.", "Explain how a bicycle works."]



def configs(actors: list[int]) -> list[tuple[str, int, int]]:
    """(label, logical cores of the runtime, actors): ``n`` one-core actors for each ``n`` in
    ``actors``, then one actor on 2 cores (what the second core gives without a second actor)."""
    rows = [(f"{n} actor{'s' * (n > 1)}, 1 core{' each' * (n > 1)}", n, n) for n in actors]
    return rows + [("1 actor, 2 cores", 2, 1)]


def run(cores: int, actors: int, args) -> tuple[float, int, str]:
    """Median tokens/s of the job on a pool of ``actors`` in a runtime of ``cores``."""
    init_ray(num_cpus=cores)
    try:
        with SessionPool.start(actors, args.big, store=None, device="cpu", progress=False) as pool:
            direction = torch.randn(pool.identity.hidden_size, generator=torch.Generator().manual_seed(0))
            vector = SteeringVector({10: direction / direction.norm() * 8.0}, pool.identity, "bench")
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.rows)]
            steering = [vector if i % 2 else None for i in range(args.rows)]

            def job() -> tuple[float, int]:
                start = time.perf_counter()
                results = pool.generate_batch(prompts, steering=steering, max_new_tokens=args.tokens,
                                              ignore_eos=True, progress=False)
                tokens = sum(len(r.token_ids) for r in results)
                assert tokens == args.rows * args.tokens and not results.job.retried
                return tokens / (time.perf_counter() - start), tokens

            job()  # warm-up
            rates = [job() for _ in range(args.rounds)]
            threads = pool._actors.placement.threads
        return statistics.median(r for r, _ in rates), rates[0][1], f"{threads}"
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--big", default=None, help="a model folder (default: the embedded model)")
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts (one core each)")
    args = parser.parse_args()
    print(f"{args.rows} rows x {args.tokens} tokens, median of {args.rounds}; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    print("| configuration | actors | torch threads each | tokens/job | tokens/s | vs 1 actor, 1 core |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    base = None
    for label, cores, actors in configs([int(n) for n in args.actors.split(",")]):  # each row when measured
        rate, tokens, threads = run(cores, actors, args)
        base = base or rate
        print(f"| {label} | {actors} | {threads} | {tokens} | {rate:.1f} | {rate / base:.2f}x |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
