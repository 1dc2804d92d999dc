"""The library's layers import one way: a module may import its own package and lower layers only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HVD = Path(__file__).resolve().parents[1] / "hvd"
# Lowest first. Packages on one layer are siblings and do not import each other.
LAYERS: list[set[str]] = [
    {"hvd.errors"},
    {"hvd.runtime"},
    {"hvd.config"},
    {"hvd.data", "hvd.model", "hvd.checkpoint"},
    {"hvd.gallery"},
    {"hvd.registry"},
    {"hvd.eval"},
    {"hvd.search", "hvd.train"},
    {"hvd.cli"},
    {"hvd.commands"},
]


def unit_of(module: str) -> str:
    """`hvd.data.shards` -> `hvd.data`; top-level modules are units of their own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer_of(module: str) -> int:
    unit = unit_of(module)
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"{module} belongs to no layer: add {unit} to LAYERS")


def hvd_imports(path: Path) -> set[str]:
    """Every `hvd...` module a file imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hvd"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("hvd"))
    return found


def module_name(path: Path) -> str:
    relative = path.relative_to(HVD.parent).with_suffix("")
    return ".".join(part for part in relative.parts if part != "__init__")


MODULES = sorted(HVD.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_module_imports_only_its_own_package_and_lower_layers(path):
    importer = module_name(path)
    if importer == "hvd":
        return
    for imported in hvd_imports(path):
        if imported == "hvd" or unit_of(imported) == unit_of(importer):
            continue
        assert layer_of(imported) < layer_of(importer), (
            f"{importer} (layer {layer_of(importer)}) imports {imported} (layer {layer_of(imported)}): "
            "imports run from higher layers to lower ones only"
        )


def test_the_checker_catches_an_upward_import(tmp_path):
    upward = tmp_path / "source.py"
    upward.write_text("from hvd.train.loop import train_step\n")
    (imported,) = hvd_imports(upward)
    assert layer_of(imported) > layer_of("hvd.registry.sources")
