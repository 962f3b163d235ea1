"""What greedy speculative decoding could gain on this CPU with the real pair (make
real-pair), with torch's dense linear layers (MKL) and with oneDNN-packed ones
(engines/cpu_linear.py, the default since): the engines' costs measured, then the ideal
speedup computed from them.

Measured in one run, fp32, the pair loaded dense, then packed in place (the same models,
the same work): after the same 200-token prefill, median of ``--rounds`` passes (each
rewound, so every one runs at the same length), the 1.5B's one-token step ``B``, its
verify of ``n`` tokens ``V(n)`` for n = 2..7, and the 0.5B's step ``s``. For a per-token
acceptance ``a`` (independent tokens, the usual model of Leviathan et al. 2023) a block of k
drafts yields ``E = (1 - a^(k+1)) / (1 - a)`` tokens for ``k s + V(k+1)``, every other cost
(judges, sampling, rewinds, Python) taken as zero: so its ideal rate is
``E / (k s + V(k+1))``, against the mirrored loop's ``1 / (B + s)`` and big alone's
``1 / B``. The second table gives the best k's ideal ratios at acceptances from 0.4 to 0.9
(0.53 and 0.77: what bench/cpu_real_pair.py measured on prose and code, docs/speculative.md).

    PYTHONPATH=. python bench/cpu_speculation_bound.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from max_jupyter.engines import TransformersEngine
from max_jupyter.engines.cpu_linear import pack_linears
from max_jupyter.loading import resolve_name
from max_jupyter.models import resolve_hf_folder
from max_jupyter.tokenizer import Tokenizer

PREFIX = 200
ACCEPTANCES = (0.4, 0.5, 0.53, 0.6, 0.7, 0.77, 0.8, 0.9)


def dense(name: str) -> TransformersEngine:
    """The pinned model ``name`` in fp32 with torch's own linear layers (not packed)."""
    folder = resolve_hf_folder(resolve_name(name))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return TransformersEngine(model, Tokenizer.from_folder(folder))


def timed(engine: TransformersEngine, ids: list[int], rounds: int) -> float:
    """Median seconds of one pass over ``ids`` after the cached prefix (then rewound)."""
    times = []
    for _ in range(rounds + 1):  # the first is a warm-up
        start = time.perf_counter()
        engine.verify(ids) if len(ids) > 1 else engine.step(ids[0])
        times.append(time.perf_counter() - start)
        engine.rewind(len(ids))
    return statistics.median(times[1:])


def costs(big: TransformersEngine, small: TransformersEngine, ids: list[int], rounds: int) -> dict:
    """``{("big", n): V(n) (n = 1: the step B), ("small", 1): s}`` in seconds."""
    out = {}
    for name, engine in (("big", big), ("small", small)):
        engine.prefill(ids[:PREFIX])
        out[name, 1] = timed(engine, ids[PREFIX:PREFIX + 1], rounds)
    for n in range(2, 8):
        out["big", n] = timed(big, ids[PREFIX:PREFIX + n], rounds)
    return out


def best(a: float, c: dict) -> tuple[int, float, float]:
    """The best k for acceptance ``a`` with costs ``c``: (k, x mirrored loop, x big alone)."""
    def rate(k: int) -> float:
        return (1 - a ** (k + 1)) / (1 - a) / (k * c["small", 1] + c["big", k + 1])
    k = max(range(1, 7), key=rate)
    return k, rate(k) * (c["big", 1] + c["small", 1]), rate(k) * c["big", 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    big, small = dense("qwen2.5-coder-1.5b"), dense("qwen2.5-coder-0.5b")
    text = " ".join(["def merge(a, b):\n    out = []\n    while a and b:"] * 40)
    ids = big.tokenizer.encode(text)[:PREFIX + 7]
    measured = {"MKL (dense)": costs(big, small, ids, args.rounds)}
    pack_linears(big.model)
    pack_linears(small.model)
    measured["oneDNN (packed)"] = costs(big, small, ids, args.rounds)
    print("| linear layers | big step ms | small step ms | " + " | ".join(f"verify {n}" for n in range(2, 8)) + " |")
    print("|---|---|---|" + "---|" * 6)
    for label, c in measured.items():
        print(f"| {label} | {c['big', 1] * 1e3:.0f} | {c['small', 1] * 1e3:.0f} | "
              + " | ".join(f"{c['big', n] * 1e3:.0f} ms ({c['big', n] / c['big', 1]:.2f} B)" for n in range(2, 8))
              + " |")
    print()
    print("| acceptance | " + " | ".join(f"{label}: best k, ideal x mirrored loop, x big alone"
                                        for label in measured) + " |")
    print("|---|" + "---|" * len(measured))
    for a in ACCEPTANCES:
        cells = [f"{k}, {mirrored:.2f}, {alone:.2f}" for k, mirrored, alone in
                 (best(a, c) for c in measured.values())]
        print(f"| {a:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
