"""CPU benchmark of the real pair (make real-pair): Qwen2.5-Coder-1.5B-Instruct writing,
Qwen2.5-Coder-0.5B-Instruct mirroring, judging and drafting.

One table. Every row generates over the same four prompts — code and prose, each greedy and
sampled (temperature 0.7, top-p 0.95, a fixed seed) — the same number of tokens (EOS
ignored). The rows run interleaved prompt by prompt, so drift of the shared machine hits
them alike; ratios are against "big alone" (unsteered) and "mirrored loop" (big + mirrored
small + probe judge, no speculation) of the same steering and the same small model: every
configuration runs with the 0.5B in fp32 and again in int8 (``dtype="int8"``, a second
engine beside the same 1.5B, with its own probe judge). Rows with k = 2..6 draft by acceptance
alone (``pace_speculation`` off: speed against acceptance); "adaptive default" is what a
user gets with ``speculate=4``: the adaptive draft length with wall-clock pacing. Tokens/s
count decode only (from the first token to the last). "judge on": the share of steps the
probe judge turned its mix on. "min x mirrored": the worst prompt's
ratio to the mirrored loop on that prompt. Steered rows add the big model's "happy" vector
(coefficient 0.5 at layers 10-17: a clear change, docs/vectors.md) at every step; the
judge's mix is the same vector at the same coefficient; the steered row with a fixed draft
length drafts the first of ``--ks``. Run time: rows x 4 prompts x ``--tokens``
tokens; ``--tokens`` and ``--ks`` shorten it.

    PYTHONPATH=. nice -n 10 python bench/cpu_real_pair.py [--tokens 32] [--ks 2,3,4,5,6]
"""
from __future__ import annotations

import argparse
import time

import torch

from max_jupyter.engines import TransformersEngine
from max_jupyter.loading import resolve_name
from max_jupyter.orchestrator import CognitiveOrchestrator, ProbeJudge
from max_jupyter.session import Session
from max_jupyter.steering.mix import Mix
from max_jupyter.steering.training import read_reply_states, train_vector

PROMPTS = [("code", "Write a Python function that merges two sorted lists into one sorted list."),
           ("prose", "Explain to a child why leaves change colour in autumn."),
           ("code", "Write a JavaScript function that debounces another function."),
           ("prose", "Describe a quiet morning in a small fishing village.")]
SAMPLED = {"temperature": 0.7, "top_p": 0.95, "seed": 7}
MODES = [{}, SAMPLED, SAMPLED, {}]  # code greedy, prose sampled, code sampled, prose greedy
HAPPY = ["I am so happy today, everything is wonderful.", "What a delightful, joyful surprise!",
         "This is the best day of my life.", "I love this beautiful sunny morning."]
SAD = ["I am so sad today, everything is awful.", "What a miserable, painful shock.",
       "This is the worst day of my life.", "I hate this gloomy, cold morning."]
PROBE_LAYER, VECTOR_LAYERS, COEF = 14, tuple(range(10, 18)), 0.5


def rows(ks: list[int]) -> dict[str, tuple[str, dict]]:
    """Row name -> (the small model's dtype, generation options; ``paced``: wall-clock
    pacing of speculation)."""
    loop = {"judges": ["sad-probe"]}
    steered = {**loop, "steering": {"happy": COEF}}
    table = {"big alone": ("fp32", {"mirror": False}),
             "big + mirrored small": ("fp32", {})}
    for small in ("fp32", "int8"):
        tag = "" if small == "fp32" else " (int8 small)"
        table |= {f"mirrored loop{tag}": (small, loop),
                  **{f"mirrored loop{tag} + speculate={k}": (small, {**loop, "speculate": k, "paced": False})
                     for k in ks},
                  f"mirrored loop{tag} + adaptive default (4, paced)": (small, {**loop, "speculate": 4, "paced": True}),
                  f"mirrored loop{tag} steered": (small, steered),
                  f"mirrored loop{tag} steered + speculate={ks[0]}": (small, {**steered, "speculate": ks[0],
                                                                                "paced": False}),
                  f"mirrored loop{tag} steered + adaptive default (4, paced)": (small, {**steered, "speculate": 4,
                                                                                         "paced": True})}
    return table


def decode(session: Session, prompt: str, mode: dict, tokens: int,
           options: dict) -> tuple[float, int, int, int, int]:
    """(decode seconds, decoded tokens, drafted, accepted, steps the judge turned its mix
    on) of one generation."""
    options = dict(options)
    CognitiveOrchestrator.pace_speculation = options.pop("paced", True)
    stamps: list[float] = []
    r = session.generate(prompt, max_new_tokens=tokens, ignore_eos=True, **mode, **options,
                         on_event=lambda ev: ev.record and stamps.append(time.perf_counter()))
    assert len(r.token_ids) == tokens, (len(r.token_ids), r.finish_reason)
    judged = sum("cheer" in s.mixes_on for s in r.steps)
    return stamps[-1] - stamps[0], len(stamps) - 1, r.drafted_tokens, r.accepted_tokens, judged


def setup(session: Session) -> float:
    """The happy vector (big model, a steered row's steering and the judge's mix) and a probe
    on the small model that turns it on where the text reads sad. Its threshold is the
    midpoint of the training sentences' scores read as chat replies, where the judge reads
    generated text (as tests/test_real_pair.py); returns the threshold."""
    vector = session.vectors.get("happy") or session.train("happy", HAPPY, SAD, layers=VECTOR_LAYERS,
                                                             progress=False)
    cheer = Mix(session.big.identity)
    cheer.set("happy", vector, COEF)
    probe = train_vector(session.small, HAPPY, SAD, layers=[PROBE_LAYER], method="mean_diff")
    unit = probe.directions[PROBE_LAYER].float() / probe.directions[PROBE_LAYER].float().norm()
    states = read_reply_states(session.small, HAPPY + SAD, [PROBE_LAYER])[:, 0] @ unit
    threshold = float(states[:len(HAPPY)].mean() + states[len(HAPPY):].mean()) / 2
    session.add_judge("sad-probe", ProbeJudge(-probe, threshold=-threshold, mix="cheer", name="sad-probe"),
                      mixes={"cheer": cheer})
    return threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--ks", default="2,3,4,5,6", help="unpaced draft lengths, one row each")
    args = parser.parse_args()
    start = time.perf_counter()
    session = Session.load("qwen2.5-coder-1.5b", small="qwen2.5-coder-0.5b", store=None, progress=False,
                           dtype=(None, torch.float32))  # the int8 0.5B (the default here) comes next
    small8 = TransformersEngine.load(resolve_name("qwen2.5-coder-0.5b"), device="cpu", dtype="int8")
    sessions = {"fp32": session, "int8": Session(session.big, small8, vectors=session.vectors)}
    for small, s in sessions.items():
        print(f"{small} small: probe threshold (training sentences read as replies): {setup(s):.3f}", flush=True)
    table = rows([int(k) for k in args.ks.split(",")])
    runs = {name: [] for name in table}  # per prompt: decode()'s tuple
    for s in sessions.values():
        s.generate(PROMPTS[0][1], max_new_tokens=4, judges=[])  # warm-up
    for done, ((_kind, prompt), mode) in enumerate(zip(PROMPTS, MODES), 1):
        for name, (small, options) in table.items():
            options = {"judges": [], **options}
            runs[name].append(decode(sessions[small], prompt, mode, args.tokens, options))
        if done < len(PROMPTS):  # a partial table: a long run cut short still says something
            print(f"\nafter {done} of {len(PROMPTS)} prompts:", flush=True)
            report(runs, args.tokens, session.big.model.dtype, resident_gb(), time.perf_counter() - start)
    dtype, memory = session.big.model.dtype, resident_gb()
    for s in sessions.values():
        s.close()
    report(runs, args.tokens, dtype, memory, time.perf_counter() - start)


def loop_of(name: str) -> str:
    """The row without speculation that row ``name`` is held against ("x mirrored loop"):
    the loop of its own small model's dtype and steering."""
    head = name.split(" + ")[0]
    return head if head.startswith("mirrored loop") else "mirrored loop"


def resident_gb() -> str:
    """This process's resident memory now and at its peak (both models and their caches)."""
    with open("/proc/self/status") as f:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}
    return f"resident {kb['VmRSS'] / 2**20:.1f} GB, peak {kb['VmHWM'] / 2**20:.1f} GB"


def acceptance(rs: list[tuple], kinds: tuple[str, ...] = ("code", "prose")) -> float | None:
    """Accepted / drafted tokens over the prompts of ``kinds`` (None: nothing drafted)."""
    picked = [r for r, (kind, _) in zip(rs, PROMPTS) if kind in kinds]
    drafted = sum(r[2] for r in picked)
    return sum(r[3] for r in picked) / drafted if drafted else None


def report(runs: dict[str, list[tuple]], tokens: int, dtype: torch.dtype, memory: str,
           total_s: float) -> None:
    rate = lambda rs: sum(r[1] for r in rs) / sum(r[0] for r in rs)
    print(f"\nCPU ({torch.get_num_threads()} threads), Qwen2.5-Coder-1.5B + 0.5B ({dtype}), "
          f"{tokens} tokens x 4 prompts (code greedy, prose sampled, code sampled, prose "
          f"greedy); {memory}; total {total_s:.0f} s\n")
    print("| row | tok/s | x big alone | x mirrored loop | min x mirrored (prompt) | acceptance "
          "(code / prose) | judge on |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        alone = runs["big alone"]
        loop = runs[loop_of(name)]
        per_prompt = [(r[1] / r[0]) / (m[1] / m[0]) for r, m in zip(rs, loop)]
        worst = min(range(len(per_prompt)), key=per_prompt.__getitem__)
        show = lambda a: "-" if a is None else f"{a:.2f}"  # noqa: E731  (None: nothing drafted)
        acc = show(acceptance(rs))
        if acc != "-":
            acc += f" ({show(acceptance(rs, ('code',)))} / {show(acceptance(rs, ('prose',)))})"
        print(f"| {name} | {rate(rs):.2f} | {rate(rs) / rate(alone):.2f} | {rate(rs) / rate(loop):.2f} "
              f"| {per_prompt[worst]:.2f} ({PROMPTS[worst][0]} {'sampled' if MODES[worst] else 'greedy'}) "
              f"| {acc} | {sum(r[4] for r in rs) / (len(rs) * tokens):.2f} |")


if __name__ == "__main__":
    main()
