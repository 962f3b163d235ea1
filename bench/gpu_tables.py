"""docs/gpu.md's measured tables, generated from ``bench/gpu_decode.py``'s JSON output.

    python bench/gpu_tables.py gpu_decode.json [docs/gpu.md]

Rewrites the text between ``<!-- gpu_tables:speed -->`` / ``<!-- /gpu_tables:speed -->``
and ``<!-- gpu_tables:memory -->`` / ``<!-- /gpu_tables:memory -->`` in the document, so
the tables are always those of one stamped run (commit, card, date). ``gpu_decode.py``
prints the same tables.
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
             "| row | ms/token | runs (min-max) | tok/s | vs (a) | speculation misses | bw frac |",
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
    doc.write_text(write(doc, "speed", render_speed(data)))
    doc.write_text(write(doc, "memory", render_memory(data)))
    print(f"{doc}: tables of commit {data['commit']} on {data['card']}")


if __name__ == "__main__":
    main()
