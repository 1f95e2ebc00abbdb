"""The pinned circuit-tracer wheel, fetched once into the cache and never installed (its pins
conflict with ours), and single functions of it loaded without its package (shared helper, not a test)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from c2srepro._cache import cache_dir, sha256_file

WHEEL = "circuit-tracer==0.5.0"
WHEEL_FILE = "circuit_tracer-0.5.0-py3-none-any.whl"
WHEEL_SHA256 = "e457e6558e1c9eb0d3d7c54ce2298492b4e919a4f7f2b8b7e217427284fdc802"


def wheel() -> Path:
    """The pinned wheel in the cache (downloaded with ``pip download --no-deps`` the first time)."""
    wheel_dir = cache_dir("wheels")
    path = wheel_dir / WHEEL_FILE
    if not path.is_file():
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                 "--only-binary=:all:", "-d", str(wheel_dir), WHEEL], capture_output=True, text=True)
        assert result.returncode == 0 and path.is_file(), f"pip download {WHEEL} failed: {result.stderr[-500:]}"
    assert sha256_file(path) == WHEEL_SHA256, f"{path} is not the pinned release; delete it"
    return path


def functions(member: str, names: Sequence[str]) -> dict[str, Any]:
    """The named top-level functions and classes of one module of the wheel, executed on their
    own (with torch and NamedTuple in scope) so that the package's other imports are not needed."""
    with zipfile.ZipFile(wheel()) as archive:
        source = archive.read(member).decode()
    tree = ast.parse(source)
    wanted = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    missing = set(names) - {n.name for n in wanted}
    assert not missing, f"{member} of {WHEEL} has no {sorted(missing)}"
    namespace: dict[str, Any] = {"torch": torch, "NamedTuple": NamedTuple, "Graph": object}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), f"{WHEEL}/{member}", "exec"), namespace)
    return {name: namespace[name] for name in names}
