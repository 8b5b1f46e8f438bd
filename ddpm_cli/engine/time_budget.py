"""`train.max_time`: when a run must stop so that it ends, closing work included, within about a step of it."""
from __future__ import annotations

import math
import time

import torch


class TimeBudget:
    """When `train.max_time` ends the run: before a step that would finish past the budget, the closing
    checkpoint and sample grid counted in, so the whole run ends within about one step of it (the first,
    compiling step included: it cannot be cut, and the run stops right after it when it overran).

    On CUDA the host would otherwise queue steps far ahead of the device (a CUDA-graph step is one launch), so
    its clock would say nothing of the work still queued: at most two steps are left in flight, which keeps the
    device fed and the host's clock within a step of the device's."""

    IN_FLIGHT = 2

    def __init__(self, t0: float, max_time: float | None, device: torch.device):
        self.deadline = None if max_time is None else t0 + max_time
        self.cuda = device.type == "cuda"
        self.step_s = 0.0  # a step's duration, smoothed; 0 until one step after the first has finished
        self.grid_s = self.checkpoint_s = 0.0  # the run's closing work: its last sample grid and checkpoint
        self._events: list = []
        self._last: float | None = None
        self._since: tuple[float, int] | None = None  # after the first step: (when, steps since), pauses and all

    def step_done(self, first: bool) -> None:
        """Call after each step: bounds the queue and measures the step time."""
        if self.deadline is None:
            return
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
            self._events.append(event)
            if len(self._events) > self.IN_FLIGHT:
                self._events.pop(0).synchronize()
        now = time.monotonic()
        self._since = (now, 0) if first or self._since is None else (self._since[0], self._since[1] + 1)
        if self._last is not None and not first:
            took = now - self._last
            self.step_s = took if not self.step_s else 0.8 * self.step_s + 0.2 * took
        self._last = now

    def pause(self) -> None:
        """The next interval holds other work (a checkpoint, a grid, an evaluation): not a step's time."""
        self._last = None

    def steps_left(self, lookahead_steps: int = 1) -> float:
        """Steps that will run in the time left: at the wall time per step since the first (the checkpoints,
        grids and evaluations between them included), the closing work counted, less the `lookahead_steps` that
        `up` keeps in hand; inf without a budget or before a step after the first."""
        if self.deadline is None or self._since is None or not self._since[1]:
            return math.inf
        now = time.monotonic()
        per_step = (now - self._since[0]) / self._since[1]
        left = self.seconds_left(now) / max(per_step, 1e-9)
        return max(0.0, left - lookahead_steps)

    def seconds_left(self, now: float | None = None) -> float:
        """Seconds of training left before the closing work must start; inf without a budget."""
        if self.deadline is None:
            return math.inf
        return self.deadline - (time.monotonic() if now is None else now) - self.grid_s - self.checkpoint_s

    def up(self, lookahead_steps: int = 1) -> bool:
        """Whether starting `lookahead_steps` more steps would end the run past its budget."""
        if self.deadline is None:
            return False
        closing = self.grid_s + self.checkpoint_s
        return time.monotonic() + lookahead_steps * self.step_s + closing >= self.deadline

    def affords(self, cost_s: float) -> bool:
        """Whether work of `cost_s` seconds between steps (a checkpoint, a grid, an evaluation the run's settings
        make due) still leaves a step and the closing work inside the budget. Where it does not, the run ends
        within a step anyway, and its closing checkpoint and grid stand for that work."""
        if self.deadline is None:
            return True
        return time.monotonic() + cost_s + self.step_s + self.grid_s + self.checkpoint_s < self.deadline
