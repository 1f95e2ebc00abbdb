"""Where the model and the transcoders run: one convention for every chapter and library call.

``device=None`` is CUDA when this machine has it, else the CPU; any other value is a device torch
knows (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) and must exist on this machine. The book's
runner refuses a profile's or ``--set``'s unavailable device with the same message before any
chapter runs (``c2srepro.book.runner.check_devices``).
"""

from __future__ import annotations

import torch

FIX = "set device: cpu or leave it out (None: cuda when available, else cpu)"


def device_problem(device: str | torch.device | None) -> str | None:
    """Why ``device`` cannot be used on this machine, or None when it can (None always can)."""
    if device is None:
        return None
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as error:
        return f"{device!r} is not a torch device ({str(error).splitlines()[0]})"
    if wanted.type == "cuda":
        if not torch.cuda.is_available():
            return "this machine has no CUDA device (torch.cuda.is_available() is False)"
        if wanted.index is not None and wanted.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if wanted.type == "mps" and not torch.backends.mps.is_available():
        return "this machine has no MPS device"
    return None


def resolve_device(device: str | torch.device | None, *, parameter: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` (None: cuda when available, else cpu), refused with a
    ValueError naming ``parameter`` and the fix when this machine lacks it."""
    problem = device_problem(device)
    if problem is not None:
        raise ValueError(f"{parameter}={str(device)!r}: {problem}; {FIX}")
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
