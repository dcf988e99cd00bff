"""The package layout is the architecture: every module imports, imports between stages point one way (the DAG each
stage declares in the "May import:" line of its docstring), no module takes part in an import cycle, and an import
inside a function is only ever one that keeps a heavy dependency out of a light command."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

import colearn

ROOT = Path(colearn.__file__).parent
FOUNDATION = {"config", "errors"}  # imported by every stage; config imports errors, errors nothing
# what a light command (`colearn merge`) must not load; envs is colearn's sibling package of gymnasium envs
HEAVY = {
    "transformers",
    "peft",
    "trl",
    "datasets",
    "gymnasium",
    "envs",
    "hydra",
    "omegaconf",
    "matplotlib",
    "tensorboard",
}


@dataclass(frozen=True)
class Import:
    target: str  # a colearn module ("colearn.models.partner"), or the top-level name of another package ("torch")
    line: int
    where: str  # "top" (at import), "typing" (under `if TYPE_CHECKING:`) or "function"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolved(module: str, name: str | None = None) -> str:
    """Returns the colearn module `from module import name` reads: the submodule when `name` is one."""
    return f"{module}.{name}" if name and f"{module}.{name}" in MODULES else module


class Imports(ast.NodeVisitor):
    def __init__(self) -> None:
        self.found: list[Import] = []
        self.where = ["top"]

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.where.append("function")
        self.generic_visit(node)
        self.where.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            self.where.append("typing" if self.where[-1] == "top" else self.where[-1])
            for child in node.body:
                self.visit(child)
            self.where.pop()
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def add(self, target: str, node: ast.AST) -> None:
        self.found.append(Import(target, node.lineno, self.where[-1]))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            name = alias.name
            self.add(resolved(name) if name.split(".")[0] == "colearn" else name.split(".")[0], node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        assert node.level == 0, f"line {node.lineno}: colearn imports are absolute"
        if node.module.split(".")[0] != "colearn":
            self.add(node.module.split(".")[0], node)
            return
        for alias in node.names:
            self.add(resolved(node.module, alias.name), node)


def imports_of(module: str) -> list[Import]:
    visitor = Imports()
    visitor.visit(ast.parse(MODULES[module].read_text(encoding="utf-8")))
    return visitor.found


IMPORTS = {module: imports_of(module) for module in MODULES}


def stage(module: str) -> str | None:
    """Returns the stage a colearn module belongs to: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def stage_doc(name: str) -> str:
    path = ROOT / name / "__init__.py" if (ROOT / name).is_dir() else ROOT / f"{name}.py"
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


STAGES = sorted({stage(m) for m in MODULES} - {None} - FOUNDATION)


def declared(name: str) -> set[str]:
    """Returns the stages `name` may import, from the "May import: a, b, c." line of its docstring."""
    found = re.findall(r"^May import: (.*?)\.?$", stage_doc(name), re.M)
    assert len(found) == 1, f"colearn/{name}: its docstring needs one line 'May import: <stages>.'"
    return {s.strip() for s in found[0].split(",")}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_declared_stages_form_a_dag():
    graph = {name: declared(name) for name in STAGES}
    for name, allowed in graph.items():
        assert allowed <= set(STAGES) | FOUNDATION, f"colearn/{name} declares unknown stages {allowed - set(STAGES)}"
    try:
        order = list(TopologicalSorter({n: a - FOUNDATION for n, a in graph.items()}).static_order())
    except CycleError as e:
        pytest.fail(f"the declared stages import each other in a cycle: {e.args[1]}")
    assert order[-1] == "cli"  # the command sits on top of everything


def test_imports_between_stages_point_the_declared_way():
    """Every import counts, at import time, for typing or inside a function: a late import cannot hide an edge."""
    wrong = []
    for module, imports in IMPORTS.items():
        here = stage(module)
        for imp in imports:
            there = stage(imp.target) if imp.target.startswith("colearn.") else None
            if there is None or there == here or here is None:
                continue
            if here in FOUNDATION:
                allowed = {"errors"} if here == "config" else set()
            else:
                allowed = declared(here) | FOUNDATION
            if there not in allowed:
                wrong.append(
                    f"{MODULES[module].relative_to(ROOT.parent)}:{imp.line} imports {imp.target} "
                    f"({here} may import {sorted(allowed)})"
                )
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_through_others():
    graph = {m: {i.target for i in imports if i.target in MODULES} for m, imports in IMPORTS.items()}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def loads_at_import(module: str) -> set[str]:
    """Returns the colearn modules and other packages importing `module` loads (its packages' __init__ included)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # a module's packages import first
        todo += [i.target for i in IMPORTS.get(name, []) if i.where == "top"]
    return seen


def test_imports_inside_functions_only_keep_heavy_dependencies_out_of_light_modules():
    """A colearn import inside a function is allowed only where the module stays light without it (nothing HEAVY
    among what it loads at import) and the imported module is heavy: otherwise it belongs at the top."""
    wrong = []
    for module, imports in IMPORTS.items():
        for imp in imports:
            if imp.where != "function" or not imp.target.startswith("colearn"):
                continue
            where = f"{MODULES[module].relative_to(ROOT.parent)}:{imp.line} imports {imp.target} in a function"
            if loads_at_import(module) & HEAVY:
                wrong.append(f"{where}, but {module} is heavy anyway ({sorted(loads_at_import(module) & HEAVY)})")
            elif not loads_at_import(imp.target) & HEAVY:
                wrong.append(f"{where}, but it is light: import it at the top")
    assert not wrong, "\n".join(wrong)


def test_merge_command_modules_are_light():
    """What `colearn merge` imports before it merges (the subprocess test in test_mergekit_recipes runs it)."""
    for module in ("colearn.cli.main", "colearn.cli.merge"):
        assert not loads_at_import(module) & HEAVY, f"{module} loads {sorted(loads_at_import(module) & HEAVY)}"


def test_layout_test_sees_a_cycle(monkeypatch):
    """The checks above could fail: a stage that imported one that imports it would be reported."""
    fake = dict(IMPORTS)
    fake["colearn.models.partner"] = [
        *IMPORTS["colearn.models.partner"],
        Import("colearn.breeding.mixture", 1, "function"),
    ]
    monkeypatch.setattr(sys.modules[__name__], "IMPORTS", fake)
    with pytest.raises(AssertionError, match="models/partner.py:1 imports colearn.breeding.mixture"):
        test_imports_between_stages_point_the_declared_way()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_module_imports_itself_through_others()
