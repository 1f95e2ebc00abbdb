"""One home for each thing: no module imports another subpackage's private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "c2srepro"


def subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""  # "" for the package's top-level modules


def test_no_private_name_is_imported_across_subpackages():
    crossings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = subpackage(".".join(("c2srepro", *path.relative_to(PACKAGE).with_suffix("").parts)))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("c2srepro."):
                continue
            if subpackage(node.module) == own or not subpackage(node.module):
                continue  # its own subpackage, or the package's shared top-level helpers
            crossings += [f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_")]
    assert not crossings, f"private names imported across subpackages: {crossings}"
