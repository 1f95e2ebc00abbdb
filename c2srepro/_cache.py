"""Where c2srepro keeps downloaded inputs and trained models, and how it writes files safely.

Cached files are trusted only as far as their checksums: ``record_checksums`` writes each file's
sha256 into ``sha256.json`` beside it when the file is written, and ``verify_checksums`` compares
them on load, so a damaged or truncated file is named (``CorruptFileError``) instead of being
read, or failing every rerun the same way."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

CACHE_ENV = "C2SREPRO_CACHE"
CHECKSUMS_FILENAME = "sha256.json"


class CorruptFileError(ValueError):
    """A cached file differs from the checksum recorded when it was written."""


def cache_dir(*parts: str) -> Path:
    """The cache root (``$C2SREPRO_CACHE``, default ``~/.cache/c2srepro``) joined with ``parts``."""
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "c2srepro")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def record_checksums(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """Record the sha256 of ``directory/name`` for each name (and no other) in
    ``directory/sha256.json``; returns what was recorded."""
    directory = Path(directory)
    recorded = {name: sha256_file(directory / name) for name in names}
    write_json_atomic(directory / CHECKSUMS_FILENAME, recorded)
    return recorded


def verify_checksums(directory: str | os.PathLike, *, fix: str) -> dict[str, str]:
    """The checksums recorded in ``directory/sha256.json``, after checking each file against its
    own; a missing or changed file raises ``CorruptFileError`` naming it, with ``fix`` (what to
    delete or rerun). A directory written before checksums were recorded has none: ``{}``."""
    directory = Path(directory)
    recorded = _read_checksums(directory)
    for name, expected in sorted(recorded.items()):
        path = directory / name
        if not path.is_file():
            raise CorruptFileError(f"{path} is missing (its checksum is recorded in {directory / CHECKSUMS_FILENAME}): {fix}")
        found = sha256_file(path)
        if found != expected:
            raise CorruptFileError(f"{path} is damaged: its sha256 {found[:12]}... differs from {expected[:12]}... "
                                   f"recorded when it was written ({path.stat().st_size} bytes now): {fix}")
    return recorded


def _read_checksums(directory: Path) -> dict[str, str]:
    path = directory / CHECKSUMS_FILENAME
    if not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text())
    except ValueError as error:
        raise CorruptFileError(f"{path} is damaged ({error}): delete {directory} to rebuild it") from error
    return recorded


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file 0600; the result gets the mode any new file gets under the umask.
        if tmp_path.is_file():
            tmp_path.chmod(0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty private directory beside ``path``; if the block succeeds it replaces ``path``
    as a whole (an older ``path`` and everything in it is removed), else it is removed. A reader
    sees the old directory or the new one, never half of either; two writers never share a folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        # mkdtemp makes the folder 0700; the result gets the mode any new folder gets under the umask.
        staging.chmod(0o777 & ~current_umask())
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_temporaries(folder: str | os.PathLike, name: str) -> list[Path]:
    """Remove what ``atomic_path`` / ``atomic_directory`` leave in ``folder`` for targets named
    ``name`` (a glob) when the writing process is killed: ``.<name>.*`` files and folders.
    Call it only where no other process writes those targets at the same time."""
    removed = []
    for leftover in sorted(Path(folder).glob(f".{name}.*")):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Strict JSON (no NaN or Infinity, which JSON has not and other readers refuse), atomically."""
    try:
        text = json.dumps(data, indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    except ValueError as error:
        where = ", ".join(_non_finite(json.loads(json.dumps(data, default=_json_default)))) or "a value"
        raise ValueError(f"{path}: {where} is NaN or infinite, which JSON cannot hold; write None (null) "
                         "for a missing number") from error
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return Path(path)


def _non_finite(value: Any, where: str = "") -> Iterator[str]:
    if isinstance(value, float) and not math.isfinite(value):
        yield where or "the value"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{where}[{index}]")


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def short_hash(data: Any) -> str:
    """12 hex digits naming a JSON-able value, e.g. the parameters behind a cached artifact."""
    text = json.dumps(data, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
