"""The engine's modules import each other in one direction (no import cycles), and the old import paths work.

    python -m pytest -q tests/test_imports.py
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_jinpan"
ENGINE = ("checkpoint.manager", "training.loop", "training.state", "parallel.parallelize", "parallel.tensor",
          "parallel.data", "parallel.optimizer", "parallel.specs")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Package modules imported by `path` (relative imports resolved; `from .x import y` may name module x.y)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif (node.module or "").startswith("megatron_jinpan"):
                base = []
            else:
                continue
            mod = ".".join(base + ([node.module] if node.module else []))
            mod = mod.removeprefix("megatron_jinpan.").removeprefix("megatron_jinpan")
            out.add(mod)
            out.update(f"{mod}.{a.name}" if mod else a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("megatron_jinpan.") for a in node.names if a.name.startswith("megatron_jinpan."))
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path, top_level_only) if m in files and m != name} for name, path in files.items()}


def test_engine_modules_are_not_in_an_import_cycle():
    graph = _graph(top_level_only=True)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return False

    cyclic = [m for m in ENGINE if reaches(m, m)]
    assert not cyclic, f"modules in an import cycle: {cyclic}"
    # The former cycles, not merely hidden behind function-level imports:
    everything = _graph(top_level_only=False)
    assert "training.loop" not in everything["checkpoint.manager"]
    assert "parallel.parallelize" not in everything["parallel.tensor"] | everything["parallel.data"]


@pytest.mark.parametrize("statement", [
    "import megatron_jinpan.parallel.tensor;"
    " from megatron_jinpan.parallel.parallelize import ParamSpec, unwrap, param_specs;"
    " from megatron_jinpan.parallel.specs import ParamSpec as S; assert S is ParamSpec",
    "import megatron_jinpan.checkpoint.manager;"
    " from megatron_jinpan.training.loop import TrainState; from megatron_jinpan.training.state import TrainState as T;"
    " assert T is TrainState",
])
def test_imports_work_from_a_fresh_interpreter_in_any_order(statement):
    subprocess.run([sys.executable, "-c", statement], check=True)
