"""Evaluate every concept of the library on the embedded model and write the per-concept
table into docs/evaluation.md (between its REPORT markers), with the commit, the machine,
its load and the settings; ``--timing`` also times the goal's evaluation (one vector, 7
coefficients, 20 prompts, 48 tokens). The table is rewritten after each concept, so a run
cut short leaves the concepts it finished. ``--big`` / ``--small`` evaluate another pair
(e.g. the real pair: ``--big qwen2.5-coder-1.5b --small qwen2.5-coder-0.5b``, the small
model reading the big one's answers); its table goes between the PAIR markers.

    PYTHONPATH=. python bench/eval_report.py [--concepts joy,formal] [--prompts 20]
        [--coefs 0.1,0.2,0.35,0.5,0.75,1,1.5] [--tokens 48] [--timing] [--big B --small S]
        [--dtype float32]

The models go where ``Session.load`` puts them (CUDA where present); the settings line
names the device and the weights' dtype.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

from max_jupyter import Session
from max_jupyter.evaluation.evaluate import DEFAULT_COEFS, DEFAULT_PROMPTS, DEFAULT_TOKENS
from max_jupyter.steering.concepts import concept, library

DOC = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"
SECTIONS = {"table": ("<!-- REPORT BEGIN -->", "<!-- REPORT END -->"),
            "timing": ("<!-- TIMING BEGIN -->", "<!-- TIMING END -->"),
            "pair": ("<!-- PAIR BEGIN -->", "<!-- PAIR END -->")}
COLUMNS = ("concept", "probe AUROC", "chosen coef", "vector", "prompting", "no steering", "random",
           "flipped", "vector concept", "random concept", "none concept", "vector ≥ prompting",
           "vector > random")


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load}"


def commit() -> str:
    """``$MAX_JUPYTER_COMMIT`` where set (a GPU box's copy of .git can be stale), else HEAD."""
    return os.environ.get("MAX_JUPYTER_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=DOC.parent).stdout.strip()


def place(device) -> str:
    """The device, with the card's name on CUDA."""
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def row(ev) -> list[str]:
    s = ev.summary()
    f = lambda x: f"{x:.2f}"
    return [ev.concept, f(s["probe_auroc"]), f"{s['chosen_coef']:+g}", f(s["steered_harmonic"]),
            f(s["prompting_harmonic"]), f(s["none_harmonic"]), f(s["random_harmonic"]),
            f(s["flipped_harmonic"]), f(s["steered_concept"]), f(s["random_concept"]), f(s["none_concept"]),
            "yes" if s["steered_harmonic"] >= s["prompting_harmonic"] else "no",
            "yes" if s["steered_harmonic"] > s["random_harmonic"] else "no"]


def write_section(section: str, body: str) -> None:
    """Replace the text between ``section``'s markers in docs/evaluation.md with ``body``."""
    begin, end = SECTIONS[section]
    text = DOC.read_text(encoding="utf-8")
    start, stop = text.index(begin) + len(begin), text.index(end)
    DOC.write_text(text[:start] + "\n" + body + "\n" + text[stop:], encoding="utf-8")


def write(rows: list[list[str]], settings: str, at: str, section: str) -> None:
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    wins = sum(r[-2] == "yes" for r in rows)
    beats = sum(r[-1] == "yes" for r in rows)
    body = "\n".join([
        f"Measured at commit `{at}` on {machine()} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
        f"Settings: {settings}.", "",
        *table, "",
        f"The vector reaches prompting's harmonic mean on {wins} of {len(rows)} concepts and beats the "
        f"random control on {beats} of {len(rows)}."])
    write_section(section, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", default=",".join(library()), help="comma-separated; empty: none")
    parser.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS)
    parser.add_argument("--coefs", default=",".join(f"{c:g}" for c in DEFAULT_COEFS))
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--big", default=None, help="a model name, folder or .gguf (default: the embedded model)")
    parser.add_argument("--small", default=None, help="with --big: the reader, a model of the same vocabulary")
    parser.add_argument("--dtype", default=None, help="the weights' dtype (default: fp32 on the CPU, fp16 on CUDA; "
                        "the small qwen2.5-coder-0.5b int8 on the CPU)")
    args = parser.parse_args()
    if args.timing and args.big:
        parser.error("--timing times the embedded model's goal; run it without --big")
    coefs = [float(c) for c in args.coefs.split(",")]
    at = commit()  # the code this run imported
    session = Session.load(args.big, args.small, store=None, progress=False, dtype=args.dtype)
    section = "table" if args.big is None else "pair"
    settings = (f"{args.prompts} prompts (half eval, half test), coefficients {args.coefs}, "
                f"{args.tokens} tokens, greedy, on {place(session.big.device)} in {session.big.dtype}, "
                f"{args.big or 'embedded'} {session.big.identity.describe()}, "
                f"read by {args.small or 'itself'} {session.reader.identity.describe()}")
    if args.timing:
        t, cpu = time.perf_counter(), time.process_time()
        load = os.getloadavg()[0]
        ev = session.evaluate("joy", progress=False)
        cpu = time.process_time() - cpu  # this process's CPU seconds, all its threads
        timing = (f"Measured at commit `{at}` on {machine()}: one vector (joy), {len(ev.coefs)} "
                  f"coefficients, {len(ev.prompts)} prompts, "
                  f"{DEFAULT_TOKENS} tokens: {time.perf_counter() - t:.0f} s for {len(ev.rows)} answers "
                  f"({ev.generation_s:.0f} s generating, {ev.scoring_s:.0f} s scoring; {cpu:.0f} CPU "
                  f"seconds, so about {cpu / os.cpu_count():.0f} s on {os.cpu_count()} idle cores) "
                  f"(load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
                  f"{os.cpu_count()} cores shared with other work).")
        write_section("timing", timing)
        print(timing, flush=True)
    rows = []
    for name in [n for n in args.concepts.split(",") if n]:
        t = time.perf_counter()
        ev = session.evaluate(name, prompts=concept(name).prompts[:args.prompts], coefs=coefs,
                              max_new_tokens=args.tokens, progress=False)
        rows.append(row(ev))
        write(rows, settings, at, section)
        print(f"{name}: {time.perf_counter() - t:.0f} s", " | ".join(rows[-1]), flush=True)
    session.close()


if __name__ == "__main__":
    main()
