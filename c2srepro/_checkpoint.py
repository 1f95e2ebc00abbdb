"""When a long training loop checkpoints: shared by the mini-C2S and the transcoders.

1. A run of ``total_steps`` steps checkpoints after every ``every_fraction`` of its steps
   (rounded), so that a long run holds checkpoints along its length; a run whose fraction rounds
   to no step at all (fewer than about ``1 / every_fraction`` steps) checkpoints only by rules 2
   and 3, not after every step (at the paper's shapes each checkpoint of the transcoders is
   gigabytes); ``every_steps`` adds a fixed step interval.
2. It also checkpoints when ``every_seconds`` of wall time have passed since the last
   checkpoint (or the start), so that a long run never loses more than that.
3. It checkpoints at the step where a call stops (``stop``), finished or paused.

A checkpoint holds the whole state of the loop, so when it is written does not change what the
loop computes: a resumed run gives the same result, bit for bit, as one never interrupted.
"""

from __future__ import annotations

import time


class CheckpointClock:
    """``due(step)`` says whether to checkpoint after 1-based ``step`` (rules 1-3); ``saved()``
    restarts the wall-time interval."""

    def __init__(
        self,
        total_steps: int,
        *,
        every_fraction: float | None,
        every_seconds: float | None,
        every_steps: int | None = None,
        stop: int | None = None,
    ):
        if every_fraction is not None and not 0 < every_fraction <= 1:
            raise ValueError(f"checkpoint_every_fraction must lie in (0, 1] or be None, got {every_fraction}")
        if every_seconds is not None and not every_seconds > 0:
            raise ValueError(f"checkpoint_every_seconds must be > 0 or None, got {every_seconds}")
        if every_steps is not None and (not isinstance(every_steps, int) or every_steps < 1):
            raise ValueError(f"checkpoint_every_steps must be an integer >= 1 or None, got {every_steps!r}")
        intervals = [every_steps] if every_steps else []
        fraction_steps = round(every_fraction * total_steps) if every_fraction is not None else 0
        if fraction_steps >= 1:
            intervals.append(fraction_steps)
        self.intervals = intervals
        self.every_seconds = every_seconds
        self.stop = total_steps if stop is None else stop
        self._last = time.monotonic()

    def due(self, step: int) -> bool:
        if step == self.stop or any(step % interval == 0 for interval in self.intervals):
            return True
        return self.every_seconds is not None and time.monotonic() - self._last >= self.every_seconds

    def saved(self) -> None:
        self._last = time.monotonic()
