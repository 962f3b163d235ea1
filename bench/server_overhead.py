"""Overhead of the HTTP path: the same greedy chat generation on the embedded model
(SmolLM2-135M, CPU) in-process (``session.generate``) and through the OpenAI-compatible
server with the official ``openai`` client, non-streamed and streamed (SSE), measured
interleaved in one run. Each generation runs exactly ``--tokens`` tokens (``ignore_eos``)
or 1 token.

Columns (medians): wall time of a 1-token and an N-token request and its slope per token;
``outside loop``: wall time minus the generation loop's own time (``elapsed_s``, measured
on the worker), for the 1-token request (per-request overhead: validation, templating,
queueing, HTTP, JSON) and per token (the slope of that difference: delivery of each token
that does not overlap the loop; streamed tokens are delivered while the loop runs, so
there it is ~0); ``CPU ms/token``: the slope of the process's CPU time (all threads: model,
server, client) and its excess over in-process — the per-token cost of the HTTP path
wherever it runs; the ratio of N-token wall times to in-process. On a shared machine the
loop's own speed varies run to run; the ``outside loop`` columns do not include it.

    python bench/server_overhead.py [--tokens 32] [--repeats 5]
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


def paths(session: Session, client: openai.OpenAI) -> dict[str, Callable[[int], float]]:
    """name -> run one generation of ``n`` tokens, return the loop's own seconds."""
    def in_process(n: int) -> float:
        return checked(session.generate(MESSAGES, max_new_tokens=n, ignore_eos=True), n)

    def http(n: int) -> float:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=n,
                                       temperature=0, extra_body={"ignore_eos": True})
        return checked(session.last, n)

    def http_stream(n: int) -> float:
        for _ in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=n,
                                                temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}):
            pass
        return checked(session.last, n)

    return {"in-process (session.generate)": in_process, "HTTP, openai client": http,
            "HTTP stream (SSE), openai client": http_stream}


def checked(result, n: int) -> float:
    assert len(result.token_ids) == n, f"generated {len(result.token_ids)} tokens, expected {n}"
    return result.elapsed_s


def measure(runs: dict[str, Callable[[int], float]], tokens: int, repeats: int) -> dict:
    """(path, length) -> (median wall s, median wall-minus-loop s), paths interleaved."""
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(repeats):
        for n in (1, tokens):
            for name, run in runs.items():
                start, cpu = time.perf_counter(), time.process_time()
                loop = run(n)
                wall = time.perf_counter() - start
                samples.setdefault((name, n), []).append(
                    (wall, wall - loop, time.process_time() - cpu))
    return {key: tuple(statistics.median(column) for column in zip(*v))
            for key, v in samples.items()}


def table(medians: dict, names: list[str], tokens: int) -> None:
    def slope(name: str, column: int) -> float:
        return (medians[(name, tokens)][column] - medians[(name, 1)][column]) / (tokens - 1)

    base_wall, base_cpu = medians[(names[0], tokens)][0], slope(names[0], 2)
    head = ("path", "1-token ms", f"{tokens}-token ms", "ms/token", "outside loop ms/request",
            "outside loop ms/token", "CPU ms/token", "extra CPU ms/token", f"wall ratio @{tokens}")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for name in names:
        (w1, o1, _), (wn, _, _) = medians[(name, 1)], medians[(name, tokens)]
        print(f"{name} | {1e3 * w1:.1f} | {1e3 * wn:.1f} | {1e3 * slope(name, 0):.2f} | "
              f"{1e3 * o1:.2f} | {1e3 * slope(name, 1):.3f} | {1e3 * slope(name, 2):.2f} | "
              f"{1e3 * (slope(name, 2) - base_cpu):+.2f} | {wn / base_wall:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
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
