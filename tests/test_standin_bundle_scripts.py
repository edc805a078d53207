"""The VISTA3D stand-in bundle's ``scripts/`` are real files of :mod:`vila_m3.standins.bundle_scripts`, copied
into every written bundle unchanged, and they need nothing of this project (the bundle runs with MONAI alone)."""

from __future__ import annotations

import ast
from importlib import resources
from pathlib import Path

from vila_m3.standins.tiny_bundles import make_tiny_brats_bundle, make_tiny_vista3d_bundle

SOURCE = Path(str(resources.files("vila_m3.standins.bundle_scripts") / "vista3d"))


def test_the_written_scripts_are_the_package_files_byte_for_byte(tmp_path):
    bundle = make_tiny_vista3d_bundle(tmp_path / "vista3d", seed=0)
    written = {path.name: path.read_bytes() for path in (bundle / "scripts").iterdir()}
    shipped = {path.name: path.read_bytes() for path in SOURCE.glob("*.py")}
    assert set(written) == {"__init__.py", "inferer.py", "evaluator.py"} == set(shipped)
    assert written == shipped
    readme = (bundle / "docs" / "README.md").read_text(encoding="utf-8")
    assert "`models/model.pt`, `scripts/`)" in readme


def test_the_brats_stand_in_has_no_scripts(tmp_path):
    bundle = make_tiny_brats_bundle(tmp_path / "brats", seed=0)
    assert not (bundle / "scripts").exists()
    assert "`models/model.pt`)" in (bundle / "docs" / "README.md").read_text(encoding="utf-8")


def test_the_scripts_import_only_monai_and_torch():
    imported = {}
    for path in sorted(SOURCE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported[path.name] = {name.split(".")[0] for name in names}
    assert set().union(*imported.values()) <= {"__future__", "monai", "torch"}, imported
    assert {"monai", "torch"} <= imported["inferer.py"] and {"monai", "torch"} <= imported["evaluator.py"]
