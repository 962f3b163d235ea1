"""Every notebook in notebooks/ runs top to bottom in a real Jupyter kernel (nbclient), and
its key outputs (cells tagged ``check-*``) say what the notebook claims."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # the notebooks on the embedded model

FOLDER = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))


def execute(name: str) -> dict[str, list[dict]]:
    """Run notebooks/<name>.ipynb; return the outputs of its ``check-*`` cells by tag."""
    nb = nbformat.read(FOLDER / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(FOLDER)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    return {tag: cell.outputs for cell in nb.cells for tag in cell.metadata.get("tags", [])
            if tag.startswith("check-")}


def text(outputs: list[dict]) -> str:
    """Printed text and plain-text results of one cell."""
    parts = [o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout"]
    parts += [o.data.get("text/plain", "") for o in outputs if "data" in o]
    return "\n".join(parts)


def result_summary(outputs: list[dict]) -> str:
    """The first line of the cell's GenerationResult (its pretty form), after checking its HTML."""
    (result,) = [o for o in outputs if o.output_type == "execute_result"]
    assert 'class="mj-tok' in result.data["text/html"]
    return result.data["text/plain"].splitlines()[0]


def images(outputs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def test_every_notebook_is_checked():
    assert {p.stem for p in NOTEBOOKS} == {"quickstart", "vectors", "judge_and_steer",
                                           "interpretability", "sweep", "evaluate"}


def test_quickstart():
    out = execute("quickstart")
    assert text(out["check-load"]).startswith("big:   LlamaForCausalLM (30 layers")
    for tag in ("check-plain", "check-steered"):
        assert re.match(r"GenerationResult\(\d+ tokens · ", result_summary(out[tag]))
    steered = result_summary(out["check-steered"])
    assert re.search(r"steered (\d+)/\1 steps", steered), steered
    assert re.fullmatch(r"torch\.Size\(\[\d+, 576\]\)", text(out["check-shape"]).strip())
    assert "steered further along joy: True" in text(out["check-projection"])


def test_vectors():
    out = execute("vectors")
    assert [l.split()[0] for l in text(out["check-list"]).splitlines()] == ["formal", "joy"]
    assert "round trip equal: True" in text(out["check-gguf"])
    hits = text(out["check-search"]).splitlines()
    assert {h.split()[0] for h in hits[:2]} == {"joy", "joy_from_gguf"}
    assert all(h.endswith("cosine +1.000") for h in hits[:2])


def test_judge_and_steer():
    out = execute("judge_and_steer")
    assert "steered 0/16 steps" in result_summary(out["check-before"])
    after = result_summary(out["check-after"])
    assert "probe:gloom@12" in after
    steered = re.search(r"steered (\d+)/(\d+) steps", after)
    assert 0 < int(steered.group(1)), after
    assert "steered steps: [" in text(out["check-plot"]) and images(out["check-plot"]) == 1
    rerun = result_summary(out["check-rerun"])
    assert "unsure" in rerun


def test_interpretability():
    out = execute("interpretability")
    assert "steered 16/16 steps" in result_summary(out["check-result"])
    assert images(out["check-projection"]) == 1
    assert "last layer = the model's choice: True" in text(out["check-lens"])
    assert images(out["check-lens"]) == 1
    rows = [l for l in text(out["check-active"]).splitlines() if re.match(r"\s*\d+ ", l)]
    assert len(rows) == 16 and all(re.search(r"(joy|calm) -?\d\.\d\d", r) for r in rows)


def test_sweep():
    out = execute("sweep")
    (table,) = [o for o in out["check-sweep"] if o.output_type == "execute_result"]
    assert table.data["text/html"].count("<tr>") == 6  # header + 5 coefficients
    assert images(out["check-plot"]) == 1
    ppl = text(out["check-ppl"])
    assert all(f"{c}:" in ppl for c in ("-0.8", "-0.4", "0.0", "0.4", "0.8"))


def test_evaluate():
    out = execute("evaluate")
    concepts = text(out["check-concepts"])
    assert concepts.count(" pairs, ") == 12 and "joy" in concepts and "french" in concepts
    assert re.match(r"GenerationResult\(\d+ tokens · ", result_summary(out["check-steered"]))
    assert text(out["check-readings"]).startswith("probe readings: True")
    (table,) = [o for o in out["check-eval"] if o.output_type == "execute_result"]
    assert "prompting" in table.data["text/html"] and "probe held-out AUROC" in table.data["text/html"]
    assert images(out["check-plot"]) == 1
    summary = text(out["check-summary"])
    assert re.search(r"chosen coefficient: (0\.35|1\.0)", summary), summary
    assert all(f"{c}_harmonic" in summary for c in ("steered", "prompting", "none", "random", "flipped"))
