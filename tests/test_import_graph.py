"""The import drawing of the product's core packages: ``vila_m3.experts``, ``vila_m3.models`` and ``vila_m3.vlm``
import each other without package cycles, and none of them imports the stand-in generators (``vila_m3.standins``,
for the command line, the demo build, benchmarks and tests only).

Imports are read from the source with :mod:`ast`, at module level and inside functions alike (a deferred import
is still a dependency), including ``importlib.import_module("vila_m3....")`` with a literal name.
"""

from __future__ import annotations

import ast
import graphlib
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
CORE = ("experts", "models", "vlm")
STANDINS_USERS = {"vila_m3.cli", "vila_m3.training.demo", "vila_m3.training.shipped_demo"}


def module_name(path: Path, root: Path) -> str:
    """``root/vila_m3/experts/cxr.py`` → ``vila_m3.experts.cxr`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every ``vila_m3...`` module that the file at ``path`` imports, anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, one level up per extra dot
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            found.add(base)
            if base == "vila_m3":  # `from vila_m3 import experts`: the names are the packages
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {name for name in found if name.split(".")[0] == "vila_m3"}


def package_of(module: str) -> str | None:
    """``vila_m3.experts.cxr`` → ``experts``; None for the top-level modules (``vila_m3.cli``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def package_edges(root: Path, packages: tuple[str, ...]) -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) → the ``module → module`` imports that draw that edge, between
    ``packages`` of ``root/vila_m3`` only."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for package in packages:
        for path in sorted((root / "vila_m3" / package).rglob("*.py")):
            source = module_name(path, root)
            for target in sorted(imported_modules(path, root)):
                other = package_of(target)
                if other in packages and other != package:
                    edges[(package, other)].append(f"{source} -> {target}")
    return dict(edges)


def package_cycle(edges: dict[tuple[str, str], list[str]]) -> list[str] | None:
    """A cycle of packages (first node repeated last), or None when the drawing has none."""
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, imported in edges:
        graph[importer].add(imported)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return None


def describe(edges: dict[tuple[str, str], list[str]]) -> str:
    return "\n".join(f"{a} -> {b}: {', '.join(via)}" for (a, b), via in sorted(edges.items()))


def test_experts_models_and_vlm_import_each_other_without_cycles():
    edges = package_edges(SRC, CORE)
    cycle = package_cycle(edges)
    assert cycle is None, f"package cycle {' -> '.join(cycle or [])}; the imports found:\n{describe(edges)}"
    assert ("experts", "models") in edges and ("vlm", "models") in edges, (
        "the reader found none of the imports it must see (the expert and VLM code read the model manifest):\n"
        + describe(edges))


def test_only_the_command_line_and_the_demo_build_import_the_stand_in_generators():
    users = {}
    for path in sorted((SRC / "vila_m3").rglob("*.py")):
        module = module_name(path, SRC)
        if package_of(module) == "standins":
            continue
        via = sorted(name for name in imported_modules(path, SRC) if package_of(name) == "standins")
        if via:
            users[module] = via
    assert set(users) <= STANDINS_USERS, f"vila_m3.standins imported by product code: {users}"
    assert {"vila_m3.cli", "vila_m3.training.demo"} <= set(users), users


def write_package(root: Path, package: str, source: str) -> None:
    folder = root / "vila_m3" / package
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("", encoding="utf-8")
    (folder / "code.py").write_text(source, encoding="utf-8")


@pytest.mark.parametrize("experts_source", [
    "from vila_m3.vlm.code import X\n",
    "def later():\n    import vila_m3.vlm.code\n",  # a deferred import counts
    "from ..vlm import code\n",  # relative
    "from vila_m3 import vlm\n",
    "import importlib\nrunner = importlib.import_module('vila_m3.vlm.code')\n",
])
def test_the_reader_finds_a_cycle_however_the_import_is_written(tmp_path, experts_source):
    write_package(tmp_path, "models", "from vila_m3.experts import code\n")
    write_package(tmp_path, "vlm", "import vila_m3.models.code\n")
    write_package(tmp_path, "experts", experts_source)
    edges = package_edges(tmp_path, CORE)
    cycle = package_cycle(edges)
    assert cycle is not None and set(cycle) == set(CORE), describe(edges)


def test_the_reader_finds_no_cycle_in_a_one_way_drawing(tmp_path):
    write_package(tmp_path, "models", "import os\n")
    write_package(tmp_path, "vlm", "from vila_m3.models.code import X\n")
    write_package(tmp_path, "experts", "from vila_m3.models import code\nfrom vila_m3.vlm.code import Y\n")
    edges = package_edges(tmp_path, CORE)
    assert package_cycle(edges) is None
    assert set(edges) == {("vlm", "models"), ("experts", "models"), ("experts", "vlm")}
