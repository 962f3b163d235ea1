"""docs/gpu.md's measured tables, generated from the benchmarks' JSON output.

    python bench/gpu_tables.py gpu_decode.json|gpu_speculative.json [docs/gpu.md]

Rewrites the text between ``<!-- gpu_tables:NAME -->`` and ``<!-- /gpu_tables:NAME -->``
in the document (``speed`` and ``memory`` from ``gpu_decode.py``, ``speculative`` from
``gpu_speculative.py``), so the tables are always those of one stamped run (commit, card,
date). The benchmarks print the same tables.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

GiB = 1024 ** 3


def _stamp(data: dict) -> str:
    exl = data["exllamav2"]
    return (f"Measured {data['date']} at commit `{data['commit']}` on {data['card']} (torch "
            f"{data['torch']}, exllamav2 {exl['version']}, flash-attn "
            f"{'present' if exl['flash_attn'] else 'absent'}), copy bandwidth "
            f"{data['bandwidth'] / 1e9:.0f} GB/s (read + write)")


def render_speed(data: dict) -> str:
    """The decode table: median ms/token of the runs, their spread, ratios, misses, bw frac."""
    base = data["rows"][0]["ms"]
    lines = [_stamp(data) + f"; batch 1, {data['prompt']}-token prompt, every row timed over "
             f"the same {data['new']} tokens (forward, greedy pick, detokenisation), median of "
             f"{data['runs']} runs after a warm-up:", "",
             "| row | ms/token | runs (min-max) | tok/s | vs (a) | ahead misses | bw frac |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        misses = "-" if r["misses"] is None else ", ".join(str(m) for m in r["misses"])
        frac = r["bytes_per_token"] / data["bandwidth"] / (r["ms"] / 1e3)
        lines.append(f"| {r['label']} | {r['ms']:.2f} | {min(r['runs_ms']):.2f}-"
                     f"{max(r['runs_ms']):.2f} | {1e3 / r['ms']:.1f} | {base / r['ms']:.2f} | "
                     f"{misses} | {frac:.1%} |")
    return "\n".join(lines)


def render_memory(data: dict) -> str:
    """The two-model memory plan of row (d) and what the device held at its peak."""
    m = data["memory"]
    return (f"{_stamp(data)}; row (d)'s two models under `max_vram_gb={m['cap_gb']:g}`. "
            f"Measured peak = torch's peak reserved + what `mem_get_info` shows outside torch "
            f"(CUDA context, kernels), the same measure the GPU test holds to the plan: "
            f"{m['measured']['total'] / GiB:.2f} GiB measured, {m['planned'] / GiB:.2f} GiB "
            f"planned.\n\n" + m["table"])


def render_speculative(data: dict) -> str:
    """``gpu_speculative.py``'s table: ms/token, tok/s, ratios to (a) and to the mirrored loop
    without speculation (same drafter), acceptance, big passes per token, the fixed-length
    model's ms/token; then the pass times and the break-even lines."""
    rows, times = data["rows"], data["pass_ms"]
    base = rows[0]["ms"]
    mirror = {r["drafter"]: r["ms"] for r in rows if r["k"] == 0}
    verify = ", ".join(f"{n} tokens {ms:.2f}" for n, ms in times["verify"].items())
    lines = [f"Measured {data['date']} at commit `{data['commit']}` on {data['card']} (torch "
             f"{data['torch']}, exllamav2 {data['exllamav2']['version']}); batch 1, greedy, "
             f"{data['prompt']}-token prompt, every row timed over the same {data['new']} tokens, "
             f"median of {data['runs']} runs after a warm-up.", "",
             "| row | ms/token | tok/s | vs (a) | vs mirror, no spec. | acceptance | "
             "big passes/token | model ms/token |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{mirror[r['drafter']] / r['ms']:.2f}" if r["drafter"] else "-",
                 "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}",
                 "-" if r["big_passes"] is None else f"{r['big_passes']:.2f}",
                 "-" if r.get("model_ms") is None else f"{r['model_ms']:.2f}"]
        lines.append(f"| {r['label']} | {r['ms']:.2f} | {1e3 / r['ms']:.1f} | {base / r['ms']:.2f} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"Pass times (ms, synchronised, at the prompt's end): 7B step {times['big']:.2f}, "
              f"1.5B step {times['small']:.2f}, 7B verify of {verify}.", "",
              *(f"- {line}" for line in data["break_even"])]
    return "\n".join(lines)


def write(doc: Path, name: str, text: str) -> str:
    """``doc``'s text with the block ``name`` replaced by ``text``."""
    source = doc.read_text()
    begin, end = f"<!-- gpu_tables:{name} -->", f"<!-- /gpu_tables:{name} -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(source):
        raise SystemExit(f"{doc}: no {begin} ... {end} block; add the markers where the table goes.")
    return pattern.sub(lambda _: f"{begin}\n{text}\n{end}", source)


def main() -> None:
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    data = json.loads(Path(sys.argv[1]).read_text())
    doc = Path(sys.argv[2] if len(sys.argv) == 3 else Path(__file__).parent.parent / "docs/gpu.md")
    if "pass_ms" in data:  # gpu_speculative.py's
        doc.write_text(write(doc, "speculative", render_speculative(data)))
    else:
        doc.write_text(write(doc, "speed", render_speed(data)))
        doc.write_text(write(doc, "memory", render_memory(data)))
    print(f"{doc}: tables of commit {data['commit']} on {data['card']}")


if __name__ == "__main__":
    main()
