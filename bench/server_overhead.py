"""Overhead of the HTTP path: the same greedy chat generation on the embedded model
(SmolLM2-135M, CPU) in-process (``session.generate``) and through the OpenAI-compatible
server with the official ``openai`` client, non-streamed and streamed (SSE), measured
interleaved in one run. Each generation runs exactly ``--tokens`` tokens (``ignore_eos``)
or 1 token; per-request overhead is the 1-token request's extra time over in-process,
per-token overhead the extra slope ``(t(N) - t(1)) / (N - 1)``. Prints one table (medians).

    python bench/server_overhead.py [--tokens 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import openai

from max_jupyter.server import BackgroundServer
from max_jupyter.session import Session

MESSAGES = [{"role": "user", "content": "Write a short paragraph about the sea."}]
MODEL = "max-jupyter"


def paths(session: Session, client: openai.OpenAI) -> dict[str, Callable[[int], int]]:
    """name -> run one generation of ``n`` tokens, return the tokens received."""
    def in_process(n: int) -> int:
        return len(session.generate(MESSAGES, max_new_tokens=n, ignore_eos=True).token_ids)

    def http(n: int) -> int:
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=n,
                                           temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    def http_stream(n: int) -> int:
        chunks = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=n, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        return [c for c in chunks][-1].usage.completion_tokens

    return {"in-process (session.generate)": in_process, "HTTP, openai client": http,
            "HTTP stream (SSE), openai client": http_stream}


def measure(runs: dict[str, Callable[[int], int]], tokens: int, repeats: int) -> dict:
    """Median seconds per (path, length), the paths interleaved in every repeat."""
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for n in (1, tokens):
            for name, run in runs.items():
                start = time.perf_counter()
                got = run(n)
                times.setdefault((name, n), []).append(time.perf_counter() - start)
                assert got == n, f"{name} generated {got} tokens, expected {n}"
    return {key: statistics.median(v) for key, v in times.items()}


def table(medians: dict, names: list[str], tokens: int) -> None:
    base1, baseN = medians[(names[0], 1)], medians[(names[0], tokens)]
    base_slope = (baseN - base1) / (tokens - 1)
    head = ("path", "1-token ms", f"{tokens}-token ms", "ms/token", "overhead ms/request",
            "overhead ms/token", f"ratio @{tokens}")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for name in names:
        t1, tn = medians[(name, 1)], medians[(name, tokens)]
        slope = (tn - t1) / (tokens - 1)
        print(f"{name} | {1e3 * t1:.1f} | {1e3 * tn:.1f} | {1e3 * slope:.2f} | "
              f"{1e3 * (t1 - base1):+.1f} | {1e3 * (slope - base_slope):+.3f} | {tn / baseN:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    session = Session.load(store=None, progress=False)
    server = BackgroundServer(session, port=0)
    try:
        client = openai.OpenAI(base_url=server.start() + "/v1", api_key="none", max_retries=0)
        runs = paths(session, client)
        for run in runs.values():  # warm-up: first-call costs out of the table
            run(2)
        medians = measure(runs, args.tokens, args.repeats)
        print(f"# server overhead: embedded model, CPU, {args.repeats} repeats, medians")
        table(medians, list(runs), args.tokens)
    finally:
        server.stop()
        session.close()


if __name__ == "__main__":
    main()
