"""Vector library latency at Qwen2.5-7B size: save, load, search and "what is active here"
on a file store, next to a NumPy brute-force cosine search over the same vectors in memory.

One run, one table. The store holds ``--vectors`` random vectors of ``--layers`` layers of
width ``--width`` (default 1,000 x 28 x 3584: 400 MB of directions plus the index). Searches
ask for the 10 nearest at one layer (1,000 candidates) and must agree with NumPy's answer;
target: search under 20 ms. Each operation shows wall-clock and CPU time (the process's,
which on a shared, busy machine stands for what an idle core would take); NumPy runs on one
thread, as SQLite does. Usage: ``python bench/vector_store.py [--vectors 1000]``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads its BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.orchestrator.trace import GenerationResult
from max_jupyter.steering import SteeringVector, VectorStore

SEARCH_LAYERS = (4, 13, 20, 27)
K = 10


def timed(fn, *args, **kwargs) -> tuple[tuple[float, float], object]:
    """``((wall ms, CPU ms), fn(...))``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return ((time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3), out


def fill(store: VectorStore, model: ModelIdentity, n: int, rng: np.random.Generator
         ) -> tuple[list[tuple[float, float]], dict[int, np.ndarray]]:
    """Save ``n`` random vectors; return each save's times and, per search layer, the
    ``[n, width]`` matrix NumPy searches."""
    tables = {l: np.empty((n, model.hidden_size), np.float32) for l in SEARCH_LAYERS}
    times = []
    for i in range(n):
        rows = rng.standard_normal((model.num_layers, model.hidden_size), dtype=np.float32)
        vector = SteeringVector(dict(enumerate(torch.from_numpy(rows))), model, f"v{i:04d}")
        ms, _ = timed(store.save, f"v{i:04d}", vector, method="bench", tags=["bench"])
        times.append(ms)
        for l in SEARCH_LAYERS:
            tables[l][i] = rows[l]
    return times, tables


def numpy_nearest(table: np.ndarray, norms: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    """Row indices of the ``k`` rows most cosine-similar to ``q``, best first."""
    sims = table @ q / (norms * np.linalg.norm(q))
    top = np.argpartition(-sims, k)[:k]
    return top[np.argsort(-sims[top])].tolist()


def row(name: str, times: list[tuple[float, float]],
        reference: list[tuple[float, float]] | None = None) -> str:
    """Median and p95 wall ms, median CPU ms; NumPy's median wall and CPU ms and the CPU ratio."""
    wall, cpu = ([t[i] for t in times] for i in (0, 1))
    cells = f"{statistics.median(wall):10.2f} {np.percentile(wall, 95):10.2f} {statistics.median(cpu):10.2f}"
    if reference:
        ref_wall, ref_cpu = (statistics.median(t[i] for t in reference) for i in (0, 1))
        cells += f" {ref_wall:10.2f} {ref_cpu:10.2f} {statistics.median(cpu) / ref_cpu:9.1f}x"
    return f"{name:34} {cells}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--width", type=int, default=3584)
    parser.add_argument("--queries", type=int, default=40)
    args = parser.parse_args()
    model = ModelIdentity("Qwen2ForCausalLM", args.layers, args.width, 152064, "bench" * 8)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.sqlite"
        with VectorStore(path) as store:
            save_ms, tables = fill(store, model, args.vectors, rng)
        open_ms, store = timed(VectorStore, path)  # reopening checks the file (quick_check)
        with store:
            names = [f"v{i:04d}" for i in rng.choice(args.vectors, min(50, args.vectors), replace=False)]
            load_ms = [timed(store.load, n)[0] for n in names]
            search_ms, numpy_ms, agree = [], [], 0
            norms = {l: np.linalg.norm(t, axis=1) for l, t in tables.items()}
            for j in range(args.queries):
                layer = SEARCH_LAYERS[j % len(SEARCH_LAYERS)]
                q = rng.standard_normal(args.width, dtype=np.float32)
                ms, hits = timed(store.nearest, torch.from_numpy(q), model=model, layer=layer, k=K)
                search_ms.append(ms)
                ms, top = timed(numpy_nearest, tables[layer], norms[layer], q, K)
                numpy_ms.append(ms)
                agree += [h.name for h in hits] == [f"v{i:04d}" for i in top]
            steps = rng.standard_normal((64, args.width), dtype=np.float32)
            result = GenerationResult(prompt_ids=[0], big_hidden={13: torch.from_numpy(steps)})
            active_ms = [timed(store.active, result, layer=13, k=5, model=model)[0] for _ in range(3)]
            size_mb = sum(p.stat().st_size for p in Path(folder).iterdir()) / 2**20
    print(f"Vector store: {args.vectors} vectors x {args.layers} layers x width {args.width}, "
          f"file {size_mb:.0f} MB; top-{K} search among {args.vectors} at one layer")
    print(f"{'operation':34} {'wall ms':>10} {'p95 wall':>10} {'CPU ms':>10} {'NumPy wall':>10} "
          f"{'NumPy CPU':>10} {'CPU ratio':>10}")
    print(row("save (one vector, one transaction)", save_ms))
    print(row("load (one vector)", load_ms))
    print(row("nearest (sqlite-vec) vs NumPy", search_ms, numpy_ms))
    print(row("active, 64 steps (per call)", active_ms))
    print(row("open (with quick_check)", [open_ms]))
    wall, cpu = (statistics.median(t[i] for t in search_ms) for i in (0, 1))
    print(f"search agrees with NumPy on {agree}/{args.queries} queries; median search "
          f"{wall:.1f} ms wall ({'meets' if wall < 20 else 'misses'} the 20 ms target), "
          f"{cpu:.1f} ms CPU ({'meets' if cpu < 20 else 'misses'} it); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
