"""The import layering of the package: lower layers never import higher ones.

The layer order is written once, here. Every ``.py`` file under ``src/secateurs`` is parsed
with :mod:`ast` (nothing is imported), and every import of a ``secateurs`` module is
collected: module level or inside functions, absolute or relative, ``importlib`` calls with
a literal name included; imports under ``if TYPE_CHECKING:`` are skipped (they never run).
A module may import modules of its own layer or of lower layers only.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "secateurs"

#: The layers, lowest first; each entry is a top-level module or subpackage of secateurs.
#: Modules of one layer may import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("validation", "tables", "targets", "schedules"),  # 1 foundation
    ("calibration",),  # 2 passes and statistics
    ("graph",),  # 3 channel coupling, slicing, channel mask planning
    ("selection",),  # 4
    ("masks",),  # 5
    ("criteria",),  # 6
    ("reconstruction",),  # 7
    ("clipping",),  # 8
    ("lr",),  # 9
    ("pruner",),  # 10
    ("oneshot",),  # 11
    ("controllers",),  # 12
    ("checkpoint",),  # 13
    ("distributed",),  # 14 mask synchronisation only
    ("structured",),  # 15 compaction, verify, counting, api, models
    ("export",),  # 16
    ("train",),  # 17
    ("tasks",),  # 18
    ("report",),  # 19
    ("search",),  # 20
    ("demo",),  # 21
    ("recipes", "hub"),  # 22 the doors: validated runs, Hugging Face folders and text files
    ("integrations",),  # 23 training frameworks: Hugging Face Trainer, Lightning, Accelerate
    ("cli",),  # 24
)
LAYER_OF: dict[str, int] = {unit: i for i, units in enumerate(LAYERS, 1) for unit in units}

#: Module-level functions whose imports are exempt: a module ``__getattr__`` forwards a
#: deprecated name to its new home, which may sit in a higher layer. The import runs only
#: when a caller uses the old name (never at import time, so it creates no cycle and no
#: hidden dependency of the layer itself) and goes away with the deprecation.
FORWARDERS = frozenset({"__getattr__"})


@dataclass(frozen=True)
class Import:
    """One import of a secateurs module found in a source file."""

    line: int
    module: str  # the imported module, e.g. ``secateurs.graph.groups`` (or ``secateurs``)
    forwarding: bool  # inside a module ``__getattr__``
    name: str = ""  # the name taken from ``module`` when it is not a submodule


def module_name(path: Path) -> str:
    """``src/secateurs/criteria/base.py`` -> ``secateurs.criteria.base``."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str | None:
    """The layer unit of a module: its top-level module or subpackage (``None``: the
    ``secateurs`` package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _exists(module: str) -> bool:
    path = SRC.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """Collects the secateurs imports of one module (see :func:`imports_of`)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.scopes: list[str] = []  # enclosing ``def`` / ``class`` names, outermost first
        self.found: list[Import] = []

    def _add(self, node: ast.stmt | ast.expr, module: str, name: str = "") -> None:
        if module == "secateurs" or module.startswith("secateurs."):
            # Only a module-level ``__getattr__`` forwards (a class's is an ordinary method).
            forwarding = bool(self.scopes) and self.scopes[0] in FORWARDERS
            self.found.append(Import(node.lineno, module, forwarding, name))

    def _resolve(self, level: int, module: str | None) -> str:
        if level == 0:
            return module or ""
        base = self.package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, module] if module else base)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # only the branch that runs
                self.visit(child)
            return
        self.generic_visit(node)

    def _visit_scope(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scopes.append(f"class {node.name}" if isinstance(node, ast.ClassDef) else node.name)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = _visit_scope
    visit_AsyncFunctionDef = _visit_scope
    visit_ClassDef = _visit_scope

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._resolve(node.level, node.module)
        for alias in node.names:
            # ``from . import x`` / ``from .pkg import sub``: the submodule when there is one.
            sub = f"{base}.{alias.name}"
            if alias.name != "*" and _exists(sub):
                self._add(node, sub)
            else:
                self._add(node, base, alias.name)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else \
            func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args and \
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            target = node.args[0].value
            if target.startswith("."):
                level = len(target) - len(target.lstrip("."))
                target = self._resolve(level, target.lstrip(".") or None)
            self._add(node, target)
        self.generic_visit(node)


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import of a secateurs module in ``source`` (the text of ``module``)."""
    collector = _Collector(module, is_package)
    collector.visit(ast.parse(source))
    return collector.found


def _is_shim(tree: ast.Module) -> bool:
    """A module that only forwards deprecated names: at module level nothing but a
    docstring, imports of other packages, assignments and ``__getattr__`` / ``__dir__``."""
    forwards = False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__dir__"):
            forwards = forwards or node.name == "__getattr__"
        elif isinstance(node, ast.Import):
            if any(a.name.split(".")[0] == "secateurs" for a in node.names):
                return False
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").split(".")[0] == "secateurs":
                return False
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) or (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) or (
                isinstance(node, ast.If) and _is_type_checking(node.test)):
            continue
        else:
            return False
    return forwards


def _sources() -> list[tuple[Path, str, ast.Module]]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, f"no sources under {PACKAGE}"
    return [(f, module_name(f), ast.parse(f.read_text(), str(f))) for f in files]


def _describe(unit: str | None, shims: frozenset[str] = frozenset()) -> str:
    if f"secateurs.{unit}" in shims:
        return f"deprecated forwarding module {unit!r}: import its new home"
    if unit is None:
        return "the top package 'secateurs'"
    if unit not in LAYER_OF:
        return f"unlisted unit {unit!r}"
    return f"layer {LAYER_OF[unit]} {unit!r}"


# -- the rules -------------------------------------------------------------------------------

def test_no_module_imports_a_higher_layer() -> None:
    offences: list[str] = []
    sources = _sources()
    shims = frozenset(module for _, module, tree in sources if _is_shim(tree))
    for path, module, tree in sources:
        importer = unit_of(module)
        if importer is None:
            continue  # secateurs/__init__.py is the top: it may import anything
        if importer not in LAYER_OF:
            continue  # reported by test_every_module_belongs_to_a_listed_layer
        collector = _Collector(module, path.name == "__init__.py")
        collector.visit(tree)
        seen: set[tuple[int, str]] = set()
        for imp in collector.found:
            if imp.forwarding or (imp.line, imp.module) in seen:
                continue  # see FORWARDERS; ``from .x import a, b`` counts once
            seen.add((imp.line, imp.module))
            imported = unit_of(imp.module)
            if imported is not None and imported in LAYER_OF \
                    and LAYER_OF[imported] <= LAYER_OF[importer]:
                continue
            what = f"{imp.name} from {imp.module}" if imp.name else imp.module
            offences.append(f"  {path.relative_to(SRC.parent)}:{imp.line}: imports {what} "
                            f"({_describe(imported, shims)}) from "
                            f"{_describe(importer)}")
    if offences:
        pytest.fail(f"{len(offences)} import(s) go up the layers (a module may import only "
                    "modules of its own layer or lower ones; the order is LAYERS in "
                    "tests/test_layers.py):\n" + "\n".join(offences), pytrace=False)


def test_every_module_belongs_to_a_listed_layer() -> None:
    unplaced = [f"  {path.relative_to(SRC.parent)} ({module}, unit {unit_of(module)!r})"
                for path, module, tree in _sources()
                if unit_of(module) is not None and unit_of(module) not in LAYER_OF
                # A module that only forwards deprecated names has no layer of its own.
                and not _is_shim(tree)]
    if unplaced:
        pytest.fail("modules outside every layer; place each in LAYERS in "
                    "tests/test_layers.py:\n" + "\n".join(unplaced), pytrace=False)


def test_every_listed_unit_exists_once() -> None:
    listed = [unit for units in LAYERS for unit in units]
    assert len(listed) == len(set(listed)), "a unit is listed twice"
    missing = [u for u in listed if not _exists(f"secateurs.{u}")]
    assert not missing, f"LAYERS lists units that are not in {PACKAGE}: {missing}"


# -- the collector itself ----------------------------------------------------------------------

COLLECTED = '''
from __future__ import annotations
import torch
import secateurs.schedules
from typing import TYPE_CHECKING
from . import base
from .. import masks, __version__
from ..graph.groups import ChannelGroup
from secateurs import validation as check
if TYPE_CHECKING:
    from ..pruner import Pruner
else:
    from ..tables import text_table
def helper():
    from ..oneshot import prune_
    import importlib
    return importlib.import_module("..report", __package__)
def __getattr__(name):
    from ..controllers import Budget
    return Budget
class Lazy:
    def __getattr__(self, name):
        from ..cli import main
        return main
'''


def test_the_collector_resolves_every_form_of_import() -> None:
    found = imports_of(COLLECTED, "secateurs.criteria.weight")
    assert [(i.module, i.forwarding) for i in found] == [
        ("secateurs.schedules", False),
        ("secateurs.criteria.base", False),
        ("secateurs.masks", False),
        ("secateurs", False),  # ``__version__`` is an attribute of the top package
        ("secateurs.graph.groups", False),
        ("secateurs.validation", False),
        ("secateurs.tables", False),  # the else branch of TYPE_CHECKING runs
        ("secateurs.oneshot", False),
        ("secateurs.report", False),
        ("secateurs.controllers", True),
        ("secateurs.cli", False),  # a class's ``__getattr__`` is no deprecation shim
    ]
    assert [i.line for i in found][:2] == [4, 6]


@pytest.mark.parametrize(("module", "is_package", "expected"), [
    ("secateurs.criteria", True, "secateurs.criteria.base"),
    ("secateurs.criteria.data", False, "secateurs.criteria.base"),
    ("secateurs.pruner", False, "secateurs.base"),
])
def test_relative_imports_resolve_by_the_files_package(module: str, is_package: bool,
                                                       expected: str) -> None:
    (found,) = imports_of("from .base import Criterion\n", module, is_package)
    assert found.module == expected


def test_a_forwarding_shim_is_recognised() -> None:
    shim = ast.parse('"""Moved."""\nfrom __future__ import annotations\nimport warnings\n'
                     '_MOVED = {"Sensitivity"}\n'
                     'def __getattr__(name):\n    from .controllers import sensitivity\n'
                     '    return getattr(sensitivity, name)\n')
    assert _is_shim(shim)
    assert not _is_shim(ast.parse("from .pruner import Pruner\n"))
    assert not _is_shim(ast.parse("def __getattr__(name):\n    pass\nclass A:\n    pass\n"))
