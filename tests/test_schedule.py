"""The shared learning-rate schedule against torch's own schedulers, and its exact decay to 0."""

from __future__ import annotations

import math

import pytest
import torch

from c2srepro._schedule import linear_warmup, warmup_cosine


def torch_schedule(total: int, warmup: int, final_fraction: float) -> list[float]:
    """The same schedule built from torch.optim.lr_scheduler: LinearLR for the warm-up, then
    CosineAnnealingLR down to ``final_fraction`` of the maximum (an independent reference)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=final_fraction)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, decay], milestones=[warmup])
    factors = []
    for _ in range(total):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("total, warmup, final_fraction", [(100, 5, 0.1), (840, 42, 0.0), (37, 10, 0.5), (20, 2, 0.0)])
def test_warmup_cosine_matches_torch_schedulers(total, warmup, final_fraction):
    mine = [warmup_cosine(step, total_steps=total, warmup_steps=warmup, final_fraction=final_fraction)
            for step in range(total)]
    assert mine == pytest.approx(torch_schedule(total, warmup, final_fraction), rel=1e-9, abs=1e-12)
    assert mine[warmup - 1] == 1.0 and mine[warmup] == 1.0


def test_decay_to_zero_is_the_plain_cosine_bit_for_bit():
    # With final_fraction 0 (the mini-C2S) the value is exactly 0.5 (1 + cos(pi p)): the
    # mini-C2S weights, and so its cache, do not depend on which formula computed it.
    total, warmup = 840, 42
    for step in range(warmup, total):
        progress = (step - warmup) / (total - warmup)
        assert warmup_cosine(step, total_steps=total, warmup_steps=warmup) == 0.5 * (1 + math.cos(math.pi * progress))


def test_linear_warmup_and_bad_arguments():
    assert [linear_warmup(step, warmup_steps=4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert linear_warmup(0, warmup_steps=0) == 1.0
    assert warmup_cosine(0, total_steps=10, warmup_steps=0) == 1.0
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        linear_warmup(0, warmup_steps=-1)
    with pytest.raises(ValueError, match="final_fraction must lie in"):
        warmup_cosine(0, total_steps=10, warmup_steps=1, final_fraction=1.5)
