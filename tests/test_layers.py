"""Imports go downward only: every module of ``max_jupyter`` (its imports read with ``ast``,
those inside functions and under ``TYPE_CHECKING`` included) imports only modules of its
own layer or of layers below it; and no imports that run form a circle. The order is in
docs/design.md."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "max_jupyter"

LAYERS: list[tuple[str, ...]] = [
    ("max_jupyter", "quickstart", "testing"),  # the package's front door and tools
    ("pool",),                    # Sessions on Ray actors: pools the Session's jobs, the sweep's too
    ("jupyter",),                 # magics, widgets, display; may start a server
    ("server",),                  # the HTTP API
    ("session",),
    ("evaluation",),              # measures of generated text; Session.evaluate (it takes the Session as an argument)
    ("handle", "worker", "loading"),
    ("orchestrator",),
    ("steering",),
    ("engines",),
    ("models", "pair", "tokenizer"),
    ("validation",),
    ("errors",),
]
"""Top to bottom. A module belongs to the layer naming its first part under
``max_jupyter`` (``max_jupyter.jupyter.magics.steer`` -> ``jupyter``; the package's own
``__init__`` is ``max_jupyter``); it may import its own layer and the layers below."""

RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, *, typing_only: bool = True) -> set[str]:
    """Every ``max_jupyter`` module ``path`` imports, anywhere in it (relative imports
    resolved); without the ``if TYPE_CHECKING:`` ones when not ``typing_only``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if (not typing_only and isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            else:
                names.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {n for n in names if n == "max_jupyter" or n.startswith("max_jupyter.")}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "max_jupyter"


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = {layer(module_name(p)) for p in MODULES} - RANK.keys()
    assert not missing, f"modules outside every layer: {sorted(missing)}; add them to LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_go_downward(path):
    here = layer(module_name(path))
    upward = sorted(m for m in imported(path) if RANK[layer(m)] < RANK[here])
    assert not upward, (f"{module_name(path)} (layer {here!r}) imports {upward} from a layer "
                        f"above it; move the code down or the caller up (see LAYERS)")


def test_no_import_circle():
    """No module reaches itself through imports that run (within a layer too; imports
    inside functions count, ``if TYPE_CHECKING:`` ones, never run, do not)."""
    known = {module_name(p) for p in MODULES}
    graph = {module_name(p): {m for m in imported(p, typing_only=False) if m in known}
             - {module_name(p)} for p in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circle = path[path.index(module):] + [module]
            pytest.fail("import circle: " + " -> ".join(circle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
