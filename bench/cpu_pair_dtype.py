"""CPU: the real pair (make real-pair) in fp32 against bf16, int8 (``dtype="int8"``: int8
linear layers) and fp32 with an int8 small model (``dtype=(None, "int8")``) — the bytes
both models' weights hold in memory (counted tensor by tensor: a process's resident size
after an earlier row was freed under-counts, as the allocator reuses that row's memory),
decode tokens/s of the big model alone and with the mirrored small one, and whether greedy
tokens change (per prompt: the first position where the big model's differ from fp32's).
The dtypes alternate round by round; the table shows medians.

    PYTHONPATH=. python bench/cpu_pair_dtype.py [--tokens 32] [--rounds 2] [--dtypes fp32,int8]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from max_jupyter import Session
from max_jupyter.engines.cpu_linear import Int8Linear

PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.",
           "Explain in two sentences why the sky is blue.",
           "Write a SQL query that counts orders per customer.",
           "What is a hash table? Answer briefly."]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": "int8", "fp32 + int8 small": (None, "int8")}


def weights_gb(session: Session) -> float:
    """Bytes of both models' parameters and buffers (oneDNN-packed weights are buffers),
    and of each ``Int8Linear``'s packed int8 weight (one byte a weight)."""
    total = 0
    for engine in (session.big, session.small):
        for module in engine.model.modules():
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            total += sum(t.numel() * t.element_size() for t in tensors)
            if isinstance(module, Int8Linear):
                total += module.in_features * module.out_features
    return total / 2**30


def decode_rate(session: Session, prompt: str, tokens: int, mirror: bool) -> tuple[float, list[int]]:
    """Decode tokens/s after the first token (the prefill) and the greedy tokens."""
    stamps: list[float] = []
    result = session.generate(prompt, max_new_tokens=tokens, ignore_eos=True, mirror=mirror,
                              on_event=lambda ev: ev.record and stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), result.token_ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="rows, by name (fp32 always)")
    args = parser.parse_args()
    names = ["fp32", *(n for n in args.dtypes.split(",") if n != "fp32")]
    rates = {(d, m): [] for d in names for m in (False, True)}
    ids, memory = {}, {}
    for _ in range(args.rounds):
        for name in names:
            dtype = DTYPES[name]
            gc.collect()
            s = Session.load("qwen2.5-coder-1.5b", small="qwen2.5-coder-0.5b", dtype=dtype,
                             store=None, progress=False)
            for prompt in PROMPTS:
                for mirror in (False, True):
                    rate, tokens = decode_rate(s, prompt, args.tokens, mirror)
                    rates[name, mirror].append(rate)
                    ids[name, prompt] = tokens
            memory[name] = weights_gb(s)
            s.close()
            del s
    print("| dtype | weights of both models, GB | big alone tok/s | big + mirrored small tok/s |")
    print("|---|---|---|---|")
    for name in names:
        print(f"| {name} | {memory[name]:.1f} | {statistics.median(rates[name, False]):.2f} | "
              f"{statistics.median(rates[name, True]):.2f} |")
    for name in names[1:]:
        print(f"\ngreedy tokens, {name} against fp32 ({args.tokens} tokens per prompt):")
        for prompt in PROMPTS:
            a, b = ids["fp32", prompt], ids[name, prompt]
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            print(f"- {prompt!r}: " + ("identical" if first is None else f"first differs at token {first}"))


if __name__ == "__main__":
    main()
