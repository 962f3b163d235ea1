"""CPU decode speed: HF ``generate`` and a bare prefill/step/argmax loop vs. our loop
unsteered, with 1 and with 3 vectors.

One run, one table. Each configuration generates the same number of tokens (EOS ignored)
from the same chat prompt, greedily, on the embedded SmolLM2-135M in fp32; the rounds
interleave the configurations and the table shows the median. Tokens/s counts the whole
call (prefill of a ~30-token prompt included) for every row alike.
Our loop is the one generation loop (the orchestrator without a small model or judges,
recording its trace); the bare loop is the engine alone, the plain loop as it was before it
became the orchestrator. Targets: steering costs <= 5% against our unsteered loop; our
unsteered loop is within 10% of HF ``generate`` and within 3% of the bare loop.
Usage: ``python bench/cpu_steering.py [--tokens 64] [--rounds 5]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from max_jupyter.engines import TransformersEngine
from max_jupyter.models import resolve_hf_folder
from max_jupyter.orchestrator import generate
from max_jupyter.steering import Mix, SteeringVector

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def random_vector(engine: TransformersEngine, layer: int, scale: float = 0.5) -> SteeringVector:
    g = torch.Generator().manual_seed(layer)
    return SteeringVector({layer: scale * torch.randn(engine.identity.hidden_size, generator=g)},
                          engine.identity, f"random@{layer}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    engine = TransformersEngine.load(device="cpu")
    plain_hf = AutoModelForCausalLM.from_pretrained(str(resolve_hf_folder()), dtype=torch.float32).eval()
    ids = engine.tokenizer.chat(PROMPT)
    one, three = Mix(engine.identity), Mix(engine.identity)
    one.set("a", random_vector(engine, 12))
    for name, layer in zip("abc", (8, 12, 16)):
        three.set(name, random_vector(engine, layer))

    def hf_generate() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = plain_hf.generate(torch.tensor([ids]), max_new_tokens=args.tokens,
                                    min_new_tokens=args.tokens, do_sample=False)
        assert out.shape[1] - len(ids) == args.tokens
        return args.tokens / (time.perf_counter() - start)

    def bare_loop() -> float:
        start = time.perf_counter()
        logits, n = engine.prefill(ids).logits, 1
        while n < args.tokens:
            logits, n = engine.step(int(logits.argmax())).logits, n + 1
        return args.tokens / (time.perf_counter() - start)

    def ours(steering) -> float:
        start = time.perf_counter()
        g = generate(engine, ids, max_new_tokens=args.tokens, ignore_eos=True, steering=steering)
        assert len(g.token_ids) == args.tokens
        return args.tokens / (time.perf_counter() - start)

    configs = {"HF generate (plain model)": hf_generate,
               "bare engine loop": bare_loop,
               "ours, unsteered": lambda: ours(None),
               "ours, 1 vector @ 1 layer": lambda: ours(one),
               "ours, 3 vectors @ 3 layers": lambda: ours(three)}
    for run in configs.values():  # warm-up
        run()
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, run in configs.items():
            rates[name].append(run())

    med = {name: statistics.median(r) for name, r in rates.items()}
    hf, base = med["HF generate (plain model)"], med["ours, unsteered"]
    print(f"\nCPU decode, {args.tokens} new tokens, {args.rounds} rounds (median), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'configuration':30} {'tok/s':>8} {'vs HF':>7} {'vs ours':>8} {'spread':>7}")
    for name, r in rates.items():
        spread = (max(r) - min(r)) / med[name]
        print(f"{name:30} {med[name]:8.2f} {med[name] / hf:7.3f} {med[name] / base:8.3f} {spread:7.1%}")
    print(f"targets: ours/HF >= 0.90 -> {base / hf:.3f}; "
          f"ours/bare >= 0.97 -> {base / med['bare engine loop']:.3f}; "
          f"steered/ours >= 0.95 -> "
          f"{min(med['ours, 1 vector @ 1 layer'], med['ours, 3 vectors @ 3 layers']) / base:.3f}")


if __name__ == "__main__":
    main()
