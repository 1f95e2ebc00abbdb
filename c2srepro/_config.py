"""Shared by the config dataclasses: building one from a dict, refusing unknown or missing fields."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """``cls(**data)``, with a ValueError naming any field ``cls`` does not have or needs."""
    if not isinstance(data, dict):
        raise ValueError(f"a {cls.__name__} is read from a dict of its fields, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    required = {
        f.name for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{cls.__name__} fields {missing} are missing (required: {sorted(required)})")
    return cls(**data)
