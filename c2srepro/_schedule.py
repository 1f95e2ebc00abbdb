"""The learning-rate schedule shared by the mini-C2S and the transcoders: linear warm-up, then cosine.

For a 0-based step ``t`` of a run of ``T`` steps with ``W`` warm-up steps and final fraction ``m``:

1. Warm-up, ``t < W``: the factor is ``(t + 1) / W``, so the first step already moves and step
   ``W - 1`` reaches the maximum.
2. Decay, ``t >= W``: with ``p = (t - W) / max(1, T - W)`` the factor is
   ``m + (1 - m) * (1 + cos(pi p)) / 2``, from 1 at ``t = W`` down towards ``m`` at the end.

The result multiplies the maximum learning rate. ``linear_warmup`` alone is step 1 (the
transcoders' L1 coefficient ramps up with it).
"""

from __future__ import annotations

import math


def linear_warmup(step: int, *, warmup_steps: int) -> float:
    """``(step + 1) / warmup_steps`` up to 1 (step 1); 1 throughout when ``warmup_steps`` is 0."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, final_fraction: float = 0.0) -> float:
    """Fraction of the maximum learning rate at 0-based ``step`` of ``total_steps`` (steps 1-2)."""
    if not 0 <= final_fraction <= 1:
        raise ValueError(f"final_fraction must lie in [0, 1], got {final_fraction}")
    if step < warmup_steps:
        return linear_warmup(step, warmup_steps=warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
